//! The block micro-kernels, written once (in a macro) and instantiated per instruction set:
//! AVX-512F (16 lanes, 32 registers), AVX2 + FMA (8 lanes, 16 registers) and a portable scalar
//! fallback. Each kernel keeps an `MR × (NV · lanes)` tile of the output in registers and
//! streams rank-1 updates into it (broadcast one A value, multiply a vector row of B).
//!
//! Two shapes of work share that core:
//! - [`PanelArgs`] (forward and dX): `C[rows, c0..] (=|+=) Σ_blocks A[rows, ablk·B..+B] · Bblk[.., c0..]`
//!   over a list of (A block-column, B block) pairs, with the depth-`B` loop fully unrolled and
//!   the accumulators kept across all blocks of the list (one load and one store of C per tile).
//! - [`SddmmArgs`] (dW): `D[o0.., c0..] (=|+=) Σ_n dy[n, o0 + r] · x[n, c0..]`, a depth-`n` loop
//!   over rows of two row-major matrices, for one kept block.

/// One output tile of a forward or dX product. All pointers are raw because the kernels run
/// in parallel on disjoint tiles of one output; see the drivers for why each access is in bounds.
pub(crate) struct PanelArgs<'a> {
    /// This tile's group of A in packed form: for each block-column `j` of A, its `MR × B`
    /// sub-block row-major (`a[(j·MR + r)·B + k] = A[r, j·B + k]`, rows past the end of A zero).
    pub a: *const f32,
    /// Valid rows in the tile (1 ..= MR); only these are stored.
    pub rows: usize,
    /// For each term, the block-column of A (the term reads columns `ablk·B .. ablk·B + B`).
    pub a_blocks: &'a [u32],
    /// The B blocks of the terms, one after the other (`B × B` each, row-major `[k][c]`): term
    /// `t` multiplies by the block at `b + t·B²`. The drivers lay them out so (the forward's
    /// transposed copy and dX's column-ordered copy), which keeps each tile's reads contiguous.
    pub b: *const f32,
    /// First column of the tile within the block.
    pub c0: usize,
    /// Values the accumulators start from (`NV · lanes` floats at column `c0`), or null for zero.
    pub init: *const f32,
    /// Row 0, column 0 of the output block-column (row-major, `ldc` floats per row).
    pub c: *mut f32,
    pub ldc: usize,
}

/// One output tile of the SDDMM (dW at one kept block).
pub(crate) struct SddmmArgs {
    /// `dy[n0, i·B + o0]`, row-major with `lddy` floats per row.
    pub dy: *const f32,
    pub lddy: usize,
    /// `x[n0, j·B + c0]`, row-major with `ldx` floats per row.
    pub x: *const f32,
    pub ldx: usize,
    /// Depth: rows of `dy` and `x` to reduce over.
    pub n: usize,
    /// `dW[o0, c0]` of the block, `ldo` floats per row.
    pub out: *mut f32,
    pub ldo: usize,
    /// Add to what `out` holds (true) or overwrite it (false).
    pub accumulate: bool,
}

/// A panel kernel instantiated for one block size and tile shape.
#[derive(Clone, Copy)]
pub(crate) struct PanelKernel {
    /// Rows per tile.
    pub mr: usize,
    /// Columns per tile (divides the block size).
    pub nr: usize,
    /// # Safety
    /// The CPU must support the kernel's instruction set and every pointer in the arguments
    /// must be valid for the reads and writes the tile implies.
    pub run: unsafe fn(&PanelArgs<'_>),
}

/// One SDDMM tile kernel; calling it is unsafe on the terms of [`PanelKernel::run`].
pub(crate) type SddmmFn = unsafe fn(&SddmmArgs);

/// An SDDMM kernel: a main tile height and, when it does not divide the block, a shorter
/// tail tile that fills the rest.
#[derive(Clone, Copy)]
pub(crate) struct SddmmKernel {
    pub mr: usize,
    pub nr: usize,
    /// # Safety
    /// As for [`PanelKernel::run`].
    pub run: SddmmFn,
    pub tail_mr: usize,
    pub tail: Option<SddmmFn>,
}

impl SddmmKernel {
    /// The row tiles covering a block of `b` rows, as (first row, kernel): as many main tiles
    /// as leave a multiple of the tail's height, then tails (at B = 32 with 6-row main and
    /// 4-row tail tiles: four of 6 and two of 4, rather than five of 6 and a 2-row tile with
    /// too few accumulators to hide the FMA latency).
    pub fn row_tiles(&self, b: usize) -> Vec<(usize, SddmmFn)> {
        let mut main = b / self.mr;
        if self.tail.is_some() {
            while main > 0 && !(b - main * self.mr).is_multiple_of(self.tail_mr) {
                main -= 1;
            }
        }
        let rest = b - main * self.mr;
        let mut tiles: Vec<_> = (0..main).map(|t| (t * self.mr, self.run)).collect();
        match self.tail {
            Some(tail) if rest.is_multiple_of(self.tail_mr) => {
                tiles.extend(
                    (0..rest / self.tail_mr).map(|t| (main * self.mr + t * self.tail_mr, tail)),
                );
            }
            _ => assert_eq!(rest, 0, "SDDMM tiles must cover the block"),
        }
        tiles
    }
}

macro_rules! simd_kernels {
    (
        $(#[$attr:meta])*
        mod $name:ident {
            lanes: $lanes:expr,
            vector: $v:ty,
            zero: $zero:path,
            load: $load:path,
            store: $store:path,
            splat: $splat:path,
            fma: $fma:path,
            prefetch: $prefetch:path $(,)?
        }
    ) => {
        pub(crate) mod $name {
            #![allow(clippy::missing_safety_doc)]
            #[allow(unused_imports)]
            use super::*;

            pub(crate) const LANES: usize = $lanes;

            /// See [`super::PanelArgs`]: `MR` rows × `NV · LANES` columns, depth-`B` blocks.
            $(#[$attr])*
            pub(crate) unsafe fn panel<const MR: usize, const NV: usize, const B: usize>(
                args: &super::PanelArgs<'_>,
            ) {
                // SAFETY (whole body): the caller guarantees that the packed group at `a` has
                // `(a_blocks[t] + 1)·B·MR` readable floats for every t, that `b` has
                // `a_blocks.len()·B²` readable floats, that `init` (when not null) has `c0 + NV·LANES`
                // readable floats and that C rows `0..rows` have `c0 + NV·LANES` writable floats.
                let mut acc = [[$zero(); NV]; MR];
                if !args.init.is_null() {
                    for v in 0..NV {
                        let bias = $load(args.init.add(args.c0 + v * LANES));
                        for row in acc.iter_mut() {
                            row[v] = bias;
                        }
                    }
                }
                let terms = args.a_blocks.len();
                for t in 0..terms {
                    let ablk = *args.a_blocks.get_unchecked(t);
                    let ap = args.a.add(ablk as usize * B * MR);
                    // The next term's A sub-block is elsewhere in the packed panel (another
                    // block-column): start fetching it now, one hint per cache line.
                    if t + 1 < terms {
                        let next = args.a.add(*args.a_blocks.get_unchecked(t + 1) as usize * B * MR);
                        for line in 0..MR * B / 16 {
                            $prefetch(next.add(line * 16));
                        }
                    }
                    let bp = args.b.add(t * B * B + args.c0);
                    for k in 0..B {
                        let mut bv = [$zero(); NV];
                        for (v, lane) in bv.iter_mut().enumerate() {
                            *lane = $load(bp.add(k * B + v * LANES));
                        }
                        for r in 0..MR {
                            let s = $splat(*ap.add(r * B + k));
                            for v in 0..NV {
                                acc[r][v] = $fma(s, bv[v], acc[r][v]);
                            }
                        }
                    }
                }
                for (r, row) in acc.iter().enumerate().take(args.rows) {
                    let cp = args.c.add(r * args.ldc + args.c0);
                    for (v, &value) in row.iter().enumerate() {
                        $store(cp.add(v * LANES), value);
                    }
                }
            }

            /// See [`super::SddmmArgs`]: `MR` rows of dW × `NV · LANES` columns.
            $(#[$attr])*
            pub(crate) unsafe fn sddmm<const MR: usize, const NV: usize>(args: &super::SddmmArgs) {
                // SAFETY (whole body): the caller guarantees `n` rows of `dy` with `MR` readable
                // floats each, `n` rows of `x` with `NV·LANES` readable floats each, and `MR`
                // rows of `out` with `NV·LANES` readable and writable floats each. Both inputs
                // are packed panels read in order (the hardware prefetcher follows them), so
                // the kernel issues no prefetch hints of its own.
                let mut acc = [[$zero(); NV]; MR];
                if args.accumulate {
                    for (r, row) in acc.iter_mut().enumerate() {
                        for (v, value) in row.iter_mut().enumerate() {
                            *value = $load(args.out.add(r * args.ldo + v * LANES));
                        }
                    }
                }
                // One rank-1 update of the tile: row `k` of the dy and x panels.
                let step = |acc: &mut [[_; NV]; MR], k: usize| {
                    let x = args.x.add(k * args.ldx);
                    let dy = args.dy.add(k * args.lddy);
                    let mut xv = [$zero(); NV];
                    for (v, lane) in xv.iter_mut().enumerate() {
                        *lane = $load(x.add(v * LANES));
                    }
                    for r in 0..MR {
                        let s = $splat(*dy.add(r));
                        for v in 0..NV {
                            acc[r][v] = $fma(s, xv[v], acc[r][v]);
                        }
                    }
                };
                // Unrolled by four: rolled, the loop's own instructions (counter, compare,
                // branch, pointer updates, the prefetch test) took about as many dispatch slots
                // per update as its loads and FMAs (counted in the disassembly).
                let body = args.n / 4 * 4;
                for k in (0..body).step_by(4) {
                    step(&mut acc, k);
                    step(&mut acc, k + 1);
                    step(&mut acc, k + 2);
                    step(&mut acc, k + 3);
                }
                for k in body..args.n {
                    step(&mut acc, k);
                }
                for (r, row) in acc.iter().enumerate() {
                    for (v, &value) in row.iter().enumerate() {
                        $store(args.out.add(r * args.ldo + v * LANES), value);
                    }
                }
            }
        }
    };
}

/// Plain-Rust stand-ins for the vector operations, one float per "vector".
pub(crate) mod scalar_ops {
    #[inline(always)]
    pub fn zero() -> f32 {
        0.0
    }
    /// # Safety
    /// `p` must be valid for a read.
    #[inline(always)]
    pub unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: guaranteed by the caller.
        unsafe { *p }
    }
    /// # Safety
    /// `p` must be valid for a write.
    #[inline(always)]
    pub unsafe fn store(p: *mut f32, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *p = v }
    }
    #[inline(always)]
    pub fn splat(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    pub fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    pub fn prefetch(_p: *const f32) {}
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_ops {
    /// A prefetch hint into all cache levels; never faults, whatever the address.
    #[inline(always)]
    pub fn prefetch(p: *const f32) {
        // SAFETY: prefetch is a hint that does not access memory architecturally (SSE, part of
        // the x86-64 baseline).
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast()) }
    }

    /// `dst = srcᵀ` for one `b × b` block, 8×8 tiles transposed in registers.
    ///
    /// # Safety
    /// AVX must be available; `src` and `dst` must hold `b²` floats; `b` a multiple of 8.
    #[target_feature(enable = "avx")]
    pub unsafe fn transpose_block_avx(src: *const f32, dst: *mut f32, b: usize) {
        use core::arch::x86_64::*;
        for r0 in (0..b).step_by(8) {
            for c0 in (0..b).step_by(8) {
                // SAFETY: rows r0..r0+8 and columns c0..c0+8 lie inside the b × b block.
                let row = |r: usize| unsafe { _mm256_loadu_ps(src.add((r0 + r) * b + c0)) };
                let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
                let (a4, a5, a6, a7) = (row(4), row(5), row(6), row(7));
                let t0 = _mm256_unpacklo_ps(a0, a1);
                let t1 = _mm256_unpackhi_ps(a0, a1);
                let t2 = _mm256_unpacklo_ps(a2, a3);
                let t3 = _mm256_unpackhi_ps(a2, a3);
                let t4 = _mm256_unpacklo_ps(a4, a5);
                let t5 = _mm256_unpackhi_ps(a4, a5);
                let t6 = _mm256_unpacklo_ps(a6, a7);
                let t7 = _mm256_unpackhi_ps(a6, a7);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let out = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (c, v) in out.into_iter().enumerate() {
                    // SAFETY: row c0 + c, columns r0..r0+8 of the transposed block are inside dst.
                    unsafe { _mm256_storeu_ps(dst.add((c0 + c) * b + r0), v) };
                }
            }
        }
    }
}

simd_kernels! {
    mod scalar {
        lanes: 1,
        vector: f32,
        zero: scalar_ops::zero,
        load: scalar_ops::load,
        store: scalar_ops::store,
        splat: scalar_ops::splat,
        fma: scalar_ops::fma,
        prefetch: scalar_ops::prefetch,
    }
}

#[cfg(target_arch = "x86_64")]
simd_kernels! {
    #[target_feature(enable = "avx2,fma")]
    mod avx2 {
        lanes: 8,
        vector: core::arch::x86_64::__m256,
        zero: core::arch::x86_64::_mm256_setzero_ps,
        load: core::arch::x86_64::_mm256_loadu_ps,
        store: core::arch::x86_64::_mm256_storeu_ps,
        splat: core::arch::x86_64::_mm256_set1_ps,
        fma: core::arch::x86_64::_mm256_fmadd_ps,
        prefetch: x86_ops::prefetch,
    }
}

#[cfg(target_arch = "x86_64")]
simd_kernels! {
    #[target_feature(enable = "avx512f")]
    mod avx512 {
        lanes: 16,
        vector: core::arch::x86_64::__m512,
        zero: core::arch::x86_64::_mm512_setzero_ps,
        load: core::arch::x86_64::_mm512_loadu_ps,
        store: core::arch::x86_64::_mm512_storeu_ps,
        splat: core::arch::x86_64::_mm512_set1_ps,
        fma: core::arch::x86_64::_mm512_fmadd_ps,
        prefetch: x86_ops::prefetch,
    }
}

/// The instruction sets the kernels are built for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F: 16 lanes, 32 vector registers.
    Avx512,
    /// AVX2 with FMA: 8 lanes, 16 vector registers.
    Avx2,
    /// Portable Rust (whatever the compiler vectorises for the baseline target).
    Scalar,
}

impl Isa {
    /// The instruction set the kernels run: the best this CPU supports, capped by
    /// `MOECORE_CPU_LEVEL` (`crate::cpu::level`).
    pub fn detect() -> Isa {
        let best = Isa::native();
        match crate::cpu::level() {
            crate::cpu::Level::Avx512 => best,
            crate::cpu::Level::Avx2 if best != Isa::Scalar => Isa::Avx2,
            _ => Isa::Scalar,
        }
    }

    /// The best instruction set this CPU supports (detected at run time, cached by std).
    fn native() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every instruction set this CPU can run, best first, whatever `MOECORE_CPU_LEVEL` says
    /// (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        let best = Isa::native();
        [Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .filter(|isa| match best {
                Isa::Avx512 => true,
                Isa::Avx2 => *isa != Isa::Avx512,
                Isa::Scalar => *isa == Isa::Scalar,
            })
            .collect()
    }

    /// Whether this CPU can run kernels of this instruction set.
    pub fn is_supported(self) -> bool {
        Isa::available().contains(&self)
    }

    /// The name used in reports (`"avx512"`, `"avx2"`, `"scalar"`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

/// The forward/dX kernel for `isa` and `block`. The caller must only run it when
/// `isa.is_supported()` (the drivers check).
pub(crate) fn panel_kernel(isa: Isa, block: usize) -> PanelKernel {
    macro_rules! pick {
        ($m:ident, $mr:literal, $nv:literal, $b:literal) => {
            PanelKernel {
                mr: $mr,
                nr: $nv * $m::LANES,
                run: $m::panel::<$mr, $nv, $b>,
            }
        };
    }
    match (isa, block) {
        // 32 zmm registers: 24 accumulators + the B row + a broadcast.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 8) => pick!(avx2, 12, 1, 8),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 16) => pick!(avx512, 24, 1, 16),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 32) => pick!(avx512, 12, 2, 32),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 64) => pick!(avx512, 6, 4, 64),
        // 16 ymm registers: 12 accumulators + B + broadcast.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, 8) => pick!(avx2, 12, 1, 8),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, 16) => pick!(avx2, 6, 2, 16),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, 32) => pick!(avx2, 6, 2, 32),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, 64) => pick!(avx2, 6, 2, 64),
        (_, 8) => pick!(scalar, 4, 8, 8),
        (_, 16) => pick!(scalar, 4, 16, 16),
        (_, 32) => pick!(scalar, 4, 16, 32),
        _ => pick!(scalar, 4, 16, 64),
    }
}

/// The dW kernel for `isa` and `block`; same contract as [`panel_kernel`].
pub(crate) fn sddmm_kernel(isa: Isa, block: usize) -> SddmmKernel {
    macro_rules! pick {
        ($m:ident, $mr:literal, $nv:literal) => {
            SddmmKernel {
                mr: $mr,
                nr: $nv * $m::LANES,
                run: $m::sddmm::<$mr, $nv>,
                tail_mr: 0,
                tail: None,
            }
        };
        ($m:ident, $mr:literal, $nv:literal, tail $tmr:literal) => {
            SddmmKernel {
                tail_mr: $tmr,
                tail: Some($m::sddmm::<$tmr, $nv>),
                ..pick!($m, $mr, $nv)
            }
        };
    }
    match (isa, block) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 8) | (Isa::Avx2, 8) => pick!(avx2, 8, 1),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 16) => pick!(avx512, 16, 1),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 32) => pick!(avx512, 12, 2, tail 8),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, _) => pick!(avx512, 6, 4, tail 4),
        // 16 ymm registers: 12 accumulators + two x vectors + a broadcast.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, _) => pick!(avx2, 6, 2, tail 4),
        (_, 8) => pick!(scalar, 4, 8),
        _ => pick!(scalar, 4, 16),
    }
}

/// Transposes one `b × b` block (`b` a multiple of 8) from `src` into `dst`, in 8×8 tiles.
pub(crate) fn transpose_block(src: &[f32], dst: &mut [f32], b: usize) {
    assert!(b.is_multiple_of(8) && src.len() >= b * b && dst.len() >= b * b);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::allows(crate::cpu::Level::Avx2) && std::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is present (checked above) and both slices hold b² floats (asserted).
        unsafe { x86_ops::transpose_block_avx(src.as_ptr(), dst.as_mut_ptr(), b) };
        return;
    }
    for r0 in (0..b).step_by(8) {
        for c0 in (0..b).step_by(8) {
            for r in r0..r0 + 8 {
                for c in c0..c0 + 8 {
                    dst[c * b + r] = src[r * b + c];
                }
            }
        }
    }
}
