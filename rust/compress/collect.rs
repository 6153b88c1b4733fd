//! Branch-free threshold collection: appends every entry whose magnitude key is at or above a
//! threshold to an index list and a value list, without a data-dependent branch.
//!
//! At the densities top-k works at (0.1–5 %), a branch per element or per 16-element block
//! mispredicts on a large share of blocks; that, not memory, used to bound the collecting
//! pass. Here every block does the same work: compare, compress the hits to the front of a
//! register (AVX-512 `vpcompressd`, AVX2 a permutation from a 256-entry table, scalar an
//! unconditional store), store the whole register and advance the output by the hit count.
//! The stores write past the hits into spare capacity reserved beforehand; only the hits are
//! ever inside the vectors' length.
//!
//! The register form of compress is used, then a plain store: the memory form
//! (`_mm512_mask_compressstoreu_*`) is microcoded and slow on AMD Zen 4.

/// Elements processed between two capacity checks (the check is a predictable branch).
const BATCH: usize = 512;
/// Lanes a kernel may write past the last hit.
const SLACK: usize = 16;

/// The instruction sets the collector is built for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    /// AVX-512F: 16 lanes, `vpcompressd` on registers.
    Avx512,
    /// AVX2: 8 lanes, a permutation looked up by the hit mask.
    Avx2,
    /// Portable: one unconditional store per element, the output advanced by the hit bit.
    Scalar,
}

impl Level {
    /// The best level this CPU supports and `MOECORE_CPU_LEVEL` allows (`crate::cpu::level`).
    pub(crate) fn detect() -> Level {
        use crate::cpu::{allows, Level as Cpu};
        [(Level::Avx512, Cpu::Avx512), (Level::Avx2, Cpu::Avx2)]
            .into_iter()
            .find(|&(l, cpu)| allows(cpu) && l.is_supported())
            .map_or(Level::Scalar, |(l, _)| l)
    }

    /// Whether this CPU can run this level.
    pub(crate) fn is_supported(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("popcnt")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Appends `(base + j, x[j])` to `idx`/`val`, in order, for every `j` with
/// `key(x[j]) >= t` (`t ≥ 0`; the key is the bit pattern with the sign cleared), and raises
/// `hi` to the largest key appended. `level` must be supported (else the scalar kernel runs);
/// `base + x.len()` must fit in u32 (indices wrap otherwise).
pub(crate) fn collect_run(
    level: Level,
    x: &[f32],
    base: u32,
    t: i32,
    idx: &mut Vec<u32>,
    val: &mut Vec<f32>,
    hi: &mut i32,
) {
    debug_assert!(t >= 0);
    let level = if level.is_supported() {
        level
    } else {
        Level::Scalar
    };
    for (b, batch) in x.chunks(BATCH).enumerate() {
        // Room for every element of the batch plus one register of overhang.
        idx.reserve(batch.len() + SLACK);
        val.reserve(batch.len() + SLACK);
        let start = idx.len();
        debug_assert_eq!(start, val.len());
        let first = base.wrapping_add((b * BATCH) as u32);
        let out = Out {
            idx: idx.as_mut_ptr(),
            val: val.as_mut_ptr(),
            len: start,
        };
        // SAFETY: both vectors have capacity for `start + batch.len() + SLACK` elements
        // (reserved just above), and each kernel writes only below
        // `start + (elements read so far) + SLACK` (see `Out`); the level is supported (checked
        // above). Every element below the returned length was written by the kernel: hits
        // are stored at `len` before `len` advances past them.
        let len = unsafe {
            match level {
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => x86::avx512(batch, first, t, out),
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => x86::avx2(batch, first, t, out),
                _ => scalar(batch, first, t, out),
            }
        };
        // SAFETY: see above; `len ≤ start + batch.len() ≤ capacity`.
        unsafe {
            idx.set_len(len);
            val.set_len(len);
        }
        // The largest key over the batch's few hits, rather than a running maximum in every
        // block of the kernel (two vector operations per block for about 1 % of hits).
        *hi = val[start..].iter().fold(*hi, |m, &v| m.max(key_of(v)));
    }
}

/// The magnitude key (bits with the sign cleared).
#[inline(always)]
fn key_of(v: f32) -> i32 {
    (v.to_bits() & 0x7fff_ffff) as i32
}

/// Raw output cursors of a kernel. Invariant the kernels keep: after reading m elements of
/// the batch, `len ≤ start + m`, and a store at `len` writes at most [`SLACK`] elements.
#[derive(Clone, Copy)]
struct Out {
    idx: *mut u32,
    val: *mut f32,
    len: usize,
}

/// The portable kernel: stores every element at the cursor and advances it by the hit bit.
///
/// # Safety
/// `out` has room for `out.len + x.len() + 1` elements.
unsafe fn scalar(x: &[f32], base: u32, t: i32, out: Out) -> usize {
    let Out { idx, val, mut len } = out;
    for (j, &v) in x.iter().enumerate() {
        let hit = key_of(v) >= t;
        // SAFETY: len ≤ out.len + j < out.len + x.len() + 1 (caller's room).
        unsafe {
            *idx.add(len) = base.wrapping_add(j as u32);
            *val.add(len) = v;
        }
        len += usize::from(hit);
    }
    len
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{scalar, Out};
    use std::arch::x86_64::*;

    /// For each 8-bit hit mask, the lanes of the hits in order, one per byte (zero-padded).
    static PERMUTATIONS: [u64; 256] = permutations();

    const fn permutations() -> [u64; 256] {
        let mut table = [0u64; 256];
        let mut mask = 0;
        while mask < 256 {
            let (mut lane, mut out, mut at) = (0u64, 0u64, 0);
            while lane < 8 {
                if mask & (1 << lane) != 0 {
                    out |= lane << (8 * at);
                    at += 1;
                }
                lane += 1;
            }
            table[mask] = out;
            mask += 1;
        }
        table
    }

    /// # Safety
    /// AVX-512F and POPCNT available; `out` has room for `out.len + x.len() + 16` elements.
    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) unsafe fn avx512(x: &[f32], base: u32, t: i32, out: Out) -> usize {
        let Out { idx, val, mut len } = out;
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let tv = _mm512_set1_epi32(t);
        let step = _mm512_set1_epi32(16);
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut at = _mm512_add_epi32(_mm512_set1_epi32(base as i32), lanes);
        let mut blocks = x.chunks_exact(16);
        for blk in blocks.by_ref() {
            // SAFETY: `blk` has 16 floats; the stores write 16 lanes at `len`, and
            // len ≤ out.len + (elements read before this block), inside the caller's room.
            unsafe {
                let v = _mm512_loadu_si512(blk.as_ptr().cast());
                let key = _mm512_and_si512(v, abs);
                let m = _mm512_cmpge_epi32_mask(key, tv);
                _mm512_storeu_si512(val.add(len).cast(), _mm512_maskz_compress_epi32(m, v));
                _mm512_storeu_si512(idx.add(len).cast(), _mm512_maskz_compress_epi32(m, at));
                len += m.count_ones() as usize;
            }
            at = _mm512_add_epi32(at, step);
        }
        let done = x.len() - blocks.remainder().len();
        let rest = Out { idx, val, len };
        // SAFETY: the caller's room covers the tail (len ≤ out.len + done).
        unsafe { scalar(blocks.remainder(), base.wrapping_add(done as u32), t, rest) }
    }

    /// # Safety
    /// AVX2 and POPCNT available; `out` has room for `out.len + x.len() + 8` elements.
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn avx2(x: &[f32], base: u32, t: i32, out: Out) -> usize {
        let Out { idx, val, mut len } = out;
        let abs = _mm256_set1_epi32(0x7fff_ffff);
        // keys and t are ≥ 0, so the signed `key > t − 1` is `key ≥ t`.
        let below = _mm256_set1_epi32(t.wrapping_sub(1));
        let step = _mm256_set1_epi32(8);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut at = _mm256_add_epi32(_mm256_set1_epi32(base as i32), lanes);
        let mut blocks = x.chunks_exact(8);
        for blk in blocks.by_ref() {
            // SAFETY: `blk` has 8 floats; the table has an 8-byte entry for every 8-bit mask
            // and the 64-bit load reads exactly entry `m`; the stores write 8 lanes at `len`,
            // inside the caller's room (as in `avx512`).
            unsafe {
                let v = _mm256_loadu_si256(blk.as_ptr().cast());
                let key = _mm256_and_si256(v, abs);
                let hit = _mm256_cmpgt_epi32(key, below);
                let m = _mm256_movemask_ps(_mm256_castsi256_ps(hit)) as usize & 0xff;
                // One zero-extending load from the table (no trip through a general register).
                let perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    PERMUTATIONS.as_ptr().add(m).cast::<__m128i>(),
                ));
                _mm256_storeu_si256(val.add(len).cast(), _mm256_permutevar8x32_epi32(v, perm));
                _mm256_storeu_si256(idx.add(len).cast(), _mm256_permutevar8x32_epi32(at, perm));
                len += m.count_ones() as usize;
            }
            at = _mm256_add_epi32(at, step);
        }
        let done = x.len() - blocks.remainder().len();
        let rest = Out { idx, val, len };
        // SAFETY: as in `avx512`.
        unsafe { scalar(blocks.remainder(), base.wrapping_add(done as u32), t, rest) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::rng::uniform;

    fn levels() -> Vec<Level> {
        [Level::Avx512, Level::Avx2, Level::Scalar]
            .into_iter()
            .filter(|l| l.is_supported())
            .collect()
    }

    fn key(v: f32) -> i32 {
        (v.to_bits() & 0x7fff_ffff) as i32
    }

    /// Reference: a plain filter.
    fn reference(x: &[f32], base: u32, t: i32) -> (Vec<u32>, Vec<f32>, i32) {
        let hits: Vec<(u32, f32)> = x
            .iter()
            .enumerate()
            .filter(|(_, &v)| key(v) >= t)
            .map(|(j, &v)| (base + j as u32, v))
            .collect();
        let hi = hits.iter().map(|&(_, v)| key(v)).max().unwrap_or(0);
        (
            hits.iter().map(|h| h.0).collect(),
            hits.iter().map(|h| h.1).collect(),
            hi,
        )
    }

    #[test]
    fn every_level_matches_a_plain_filter() {
        assert!(levels().contains(&Level::Scalar));
        // Lengths around the block (8, 16) and batch sizes, densities from none to all,
        // negative values, ±0, infinities and NaN (their keys are above any finite one).
        for &n in &[0usize, 1, 7, 8, 9, 15, 16, 17, 511, 512, 513, 1025, 5000] {
            let mut x: Vec<f32> = (0..n as u64)
                .map(|i| (uniform(n as u64, i) - 0.5) * 8.0)
                .collect();
            if n > 20 {
                x[3] = -0.0;
                x[11] = f32::INFINITY;
                x[19] = f32::NAN;
            }
            for &thr in &[0.0f32, 1e-3, 1.0, 3.5, 3.99, 1e30, f32::INFINITY] {
                let t = key(thr);
                let base = 1_000 + n as u32;
                let (want_i, want_v, want_hi) = reference(&x, base, t);
                for level in levels() {
                    let (mut idx, mut val, mut hi) = (vec![7u32], vec![0.25f32], 0);
                    collect_run(level, &x, base, t, &mut idx, &mut val, &mut hi);
                    assert_eq!(idx[1..], want_i[..], "{level:?} n={n} t={thr}");
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&val[1..]), bits(&want_v), "{level:?} n={n} t={thr}");
                    assert_eq!((idx[0], val[0]), (7, 0.25), "earlier entries are kept");
                    assert_eq!(hi, want_hi, "{level:?} n={n} t={thr}");
                }
            }
        }
    }

    #[test]
    fn hi_only_rises_and_tight_capacity_grows() {
        let x = vec![2.0f32; 100];
        for level in levels() {
            // A starting `hi` above every hit stays; an exactly-full vector grows.
            let (mut idx, mut val) = (Vec::with_capacity(0), Vec::with_capacity(0));
            let mut hi = key(5.0);
            collect_run(level, &x, 0, key(1.0), &mut idx, &mut val, &mut hi);
            assert_eq!(hi, key(5.0));
            assert_eq!(idx, (0..100).collect::<Vec<u32>>());
            assert!(val.iter().all(|&v| v == 2.0));
        }
    }

    #[test]
    fn indices_near_the_u32_limit() {
        let x = vec![1.0f32; 40];
        let base = u32::MAX - 40;
        for level in levels() {
            let (mut idx, mut val, mut hi) = (Vec::new(), Vec::new(), 0);
            collect_run(level, &x, base, 0, &mut idx, &mut val, &mut hi);
            assert_eq!(idx, (base..base + 40).collect::<Vec<u32>>(), "{level:?}");
        }
    }
}
