//! moecore's own single-thread f32 GEMM for AVX2 + FMA: packed panels and a 6 × 16
//! register-blocked micro-kernel (the BLIS layout).
//!
//! Why not only the `gemm` crate: on an AVX2 CPU (Zen 3) its f32 kernel measured 15–20 %
//! below OpenBLAS's at the MoE expert shapes (512–1024 × 256–512 × 256–1024, one thread:
//! ~47–56 against ~56–62 GFLOP/s of CPU time), and the expert FFN is most of an MoE layer.
//! This kernel keeps 12 accumulators (6 rows × two 8-lane vectors) in registers, streams
//! `A` packed 6 rows wide and `B` packed 16 columns wide, so every loaded value feeds 6 or 16
//! FMAs. It also makes `MOECORE_CPU_LEVEL=avx2` reach the GEMMs on an AVX-512 machine.
//!
//! Blocking: `KC` × 16 panels of `B` stay in L1 while a 6 × `KC` panel of `A` streams
//! through; an `MC` × `KC` block of `A` (144 KiB) stays in L2 (Zen 3: 512 KiB per core),
//! a `KC` × `NC` block of `B` in L3.

use std::cell::RefCell;

use super::gemm::Strided;

const MR: usize = 6;
const NR: usize = 16;
const KC: usize = 256;
const MC: usize = 144;
const NC: usize = 2048;

thread_local! {
    /// Packed panels of A and B, kept per thread so a call neither allocates nor faults in
    /// fresh pages (the FFN tiles call this thousands of times a step).
    static PACKS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` with `accumulate`) on this thread, with the
/// AVX2 + FMA micro-kernel.
///
/// # Safety
/// The CPU must support AVX2 and FMA. `dst` must be valid for reads (with `accumulate`) and
/// writes of every element `(i, j)`, `i < m`, `j < n`, at `dst + i·dst_rs + j`, and alias
/// neither operand; each operand must cover its `m × k` / `k × n` elements (the caller,
/// `gemm::product`, asserts all of this). `k` must be at least 1.
pub(crate) unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    accumulate: bool,
) {
    PACKS.with(|packs| {
        let mut packs = packs.borrow_mut();
        let (a_pack, b_pack) = &mut *packs;
        let kc_max = k.min(KC);
        a_pack.resize(MC.min(m).next_multiple_of(MR) * kc_max, 0.0);
        b_pack.resize(NC.min(n).next_multiple_of(NR) * kc_max, 0.0);
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                pack_b(b_pack, rhs, pc, kc, jc, nc);
                let add = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    pack_a(a_pack, lhs, ic, mc, pc, kc);
                    for jr in (0..nc).step_by(NR) {
                        let nr = NR.min(nc - jr);
                        let b_panel = &b_pack[jr * kc..(jr + NR) * kc];
                        for ir in (0..mc).step_by(MR) {
                            let mr = MR.min(mc - ir);
                            let a_panel = &a_pack[ir * kc..(ir + MR) * kc];
                            // SAFETY: (ic + ir + i, jc + jr + j) for i < mr, j < nr is inside
                            // the m × n result (the caller's contract); AVX2 + FMA by the
                            // caller's contract; the panels hold kc × 6 and kc × 16 floats.
                            unsafe {
                                let c = dst.add((ic + ir) * dst_rs + jc + jr);
                                tile(kc, a_panel, b_panel, c, dst_rs, (mr, nr), add);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Packs rows `ic .. ic + mc`, columns `pc .. pc + kc` of `lhs` as panels of 6 rows: panel
/// `r` holds, for each `p`, the 6 values of column `pc + p` (zeros past `mc`).
fn pack_a(pack: &mut [f32], lhs: Strided<'_>, ic: usize, mc: usize, pc: usize, kc: usize) {
    for (r, panel) in pack[..mc.next_multiple_of(MR) * kc]
        .chunks_exact_mut(MR * kc)
        .enumerate()
    {
        let i0 = ic + r * MR;
        let rows = MR.min(ic + mc - i0);
        for i in 0..MR {
            let row = (i < rows)
                .then(|| Line::new(lhs.data, (i0 + i) * lhs.rs + pc * lhs.cs, lhs.cs, kc));
            fill_lane(panel, MR, i, row);
        }
    }
}

/// Packs rows `pc .. pc + kc`, columns `jc .. jc + nc` of `rhs` as panels of 16 columns:
/// panel `c` holds, for each `p`, the 16 values of row `pc + p` (zeros past `nc`).
fn pack_b(pack: &mut [f32], rhs: Strided<'_>, pc: usize, kc: usize, jc: usize, nc: usize) {
    for (c, panel) in pack[..nc.next_multiple_of(NR) * kc]
        .chunks_exact_mut(NR * kc)
        .enumerate()
    {
        let j0 = jc + c * NR;
        let cols = NR.min(jc + nc - j0);
        if rhs.cs == 1 && cols == NR {
            // Row-major B: each packed row is 16 contiguous values.
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                let at = (pc + p) * rhs.rs + j0;
                row.copy_from_slice(&rhs.data[at..at + NR]);
            }
            continue;
        }
        for j in 0..NR {
            let col = (j < cols)
                .then(|| Line::new(rhs.data, pc * rhs.rs + (j0 + j) * rhs.cs, rhs.rs, kc));
            fill_lane(panel, NR, j, col);
        }
    }
}

/// `len` values of an operand, `step` apart from `start`: a row or a column of a block.
struct Line<'a> {
    data: &'a [f32],
    step: usize,
    len: usize,
}

impl<'a> Line<'a> {
    fn new(data: &'a [f32], start: usize, step: usize, len: usize) -> Self {
        Line {
            data: &data[start..],
            step,
            len,
        }
    }
}

/// Writes lane `lane` of a panel `width` values wide (`panel[p·width + lane]` for every `p`)
/// from `line`, or zeros without one. The slices keep the loops free of per-element bounds
/// checks: packing is O(m·k + k·n) against the product's O(m·n·k), but a checked scalar
/// gather measured 10–20 % of the product at the expert shapes.
fn fill_lane(panel: &mut [f32], width: usize, lane: usize, line: Option<Line<'_>>) {
    let dst = panel.iter_mut().skip(lane).step_by(width);
    match line {
        None => dst.for_each(|v| *v = 0.0),
        Some(Line { data, step: 1, len }) => dst.zip(&data[..len]).for_each(|(v, s)| *v = *s),
        Some(Line { data, step: 0, .. }) => dst.for_each(|v| *v = data[0]),
        Some(Line { data, step, len }) => {
            let src = &data[..(len - 1) * step + 1];
            dst.zip(src.iter().step_by(step)).for_each(|(v, s)| *v = *s);
        }
    }
}

/// One `mr × nr` (at most 6 × 16) tile of the result at `c` (row stride `rs`): the full
/// tile straight into `c`, a partial one through a 6 × 16 buffer.
///
/// # Safety
/// AVX2 + FMA; `c` valid for reads (with `add`) and writes of the `mr × nr` tile.
#[inline(always)]
unsafe fn tile(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    rs: usize,
    (mr, nr): (usize, usize),
    add: bool,
) {
    if mr == MR && nr == NR {
        // SAFETY: the whole 6 × 16 tile lies inside the result (the contract).
        unsafe { kernel(kc, a, b, c, rs, add) };
        return;
    }
    let mut buf = [0.0f32; MR * NR];
    // SAFETY: `buf` is a 6 × 16 tile with row stride 16; nothing is read from it.
    unsafe { kernel(kc, a, b, buf.as_mut_ptr(), NR, false) };
    for i in 0..mr {
        for j in 0..nr {
            // SAFETY: (i, j) with i < mr, j < nr lies inside the result's tile.
            unsafe {
                let out = c.add(i * rs + j);
                *out = if add { *out } else { 0.0 } + buf[i * NR + j];
            }
        }
    }
}

/// The 6 × 16 micro-kernel: `c (+)= Σ_p a[p·6 + i] · b[p·16 + j]` for the panels `a`
/// (`kc` × 6) and `b` (`kc` × 16).
///
/// # Safety
/// AVX2 + FMA; `c` valid for reads (with `add`) and writes of 6 rows of 16 floats,
/// `rs` apart; `a` and `b` hold at least `kc`·6 and `kc`·16 floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(kc: usize, a: &[f32], b: &[f32], c: *mut f32, rs: usize, add: bool) {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };
    let (a, b) = (&a[..kc * MR], &b[..kc * NR]);
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        // SAFETY: `bp` holds 16 floats: two unaligned 8-lane loads.
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(bp.as_ptr()),
                _mm256_loadu_ps(bp.as_ptr().add(8)),
            )
        };
        for (row, av) in acc.iter_mut().zip(ap) {
            let ai = _mm256_broadcast_ss(av);
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: row i's 16 floats at c + i·rs lie in the tile (the contract).
        unsafe {
            let p = c.add(i * rs);
            let (mut v0, mut v1) = (row[0], row[1]);
            if add {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(p));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(p.add(8)));
            }
            _mm256_storeu_ps(p, v0);
            _mm256_storeu_ps(p.add(8), v1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Strided<'_>, b: Strided<'_>) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| f64::from(a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs]))
                    .sum();
            }
        }
        c
    }

    fn avx2() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    /// Against a float64 reference, on shapes that cross every block edge (partial 6-row and
    /// 16-column tiles, several KC and MC blocks, more than NC columns), with row-major and
    /// transposed operands, into a strided destination whose gaps must stay untouched, and
    /// with accumulation.
    #[test]
    fn matches_reference_across_blocks_strides_and_edges() {
        if !avx2() {
            eprintln!("skipped: this CPU has no AVX2 + FMA");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (5, 15, 3),
            (6, 16, 1),
            (7, 17, 257),
            (150, 33, 300),
            (13, 2100, 9),
            (300, 40, 520),
        ];
        for (m, n, k) in shapes {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
                .collect();
            for (av, bv) in [
                (
                    Strided {
                        data: &a,
                        rs: k,
                        cs: 1,
                    },
                    Strided {
                        data: &b,
                        rs: n,
                        cs: 1,
                    },
                ),
                (
                    Strided {
                        data: &a,
                        rs: 1,
                        cs: m,
                    },
                    Strided {
                        data: &b,
                        rs: 1,
                        cs: k,
                    },
                ),
            ] {
                let want = naive(m, n, k, av, bv);
                let rs = n + 3;
                for accumulate in [false, true] {
                    let init = |i: usize| if i % rs < n { (i % 5) as f32 } else { f32::NAN };
                    let mut c: Vec<f32> = (0..m * rs).map(init).collect();
                    // SAFETY: AVX2 + FMA checked above; c holds m rows of rs ≥ n floats, the
                    // operands cover their shapes.
                    unsafe { sgemm((m, n, k), c.as_mut_ptr(), rs, av, bv, accumulate) };
                    for (idx, &v) in c.iter().enumerate() {
                        let (i, j) = (idx / rs, idx % rs);
                        if j >= n {
                            assert!(v.is_nan(), "gap ({i}, {j}) of {m}x{n}x{k} was written");
                            continue;
                        }
                        let base = if accumulate {
                            f64::from(init(idx))
                        } else {
                            0.0
                        };
                        let w = want[i * n + j] + base;
                        assert!(
                            (f64::from(v) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{m}x{n}x{k} acc={accumulate} ({i}, {j}): {v} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
