//! Top-k selection by magnitude: exact (histogram + introselect) and sampled (DGC threshold).
//! See the module docs of [`crate::compress`] for the algorithms and the tie rule.

use super::scan::{
    first_nonfinite, key, sample_keys, Candidates, Selection, Sweep, BUCKETS, BUCKET_SHIFT,
    NONFINITE_KEY,
};
use std::cell::RefCell;

use super::{CompressError, MAX_N};

/// How to select the k largest-magnitude entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The exact top-k, O(n): histogram of magnitudes, then introselect among the candidates.
    Exact,
    /// Deep Gradient Compression's sampled threshold with adaptive correction.
    Sampled {
        /// Seeds the sample's offset; equal seeds give equal results.
        seed: u64,
        /// Return exactly k entries (true) or every entry above the corrected threshold,
        /// between k and ⌈1.3k⌉ of them (false).
        exact_k: bool,
    },
}

/// Correction rounds of the sampled threshold before falling back to the exact method.
const MAX_ROUNDS: usize = 10;

/// Indices (increasing) of the k entries of `x` with the largest |x|, ties to the lower index.
/// NaN or ±inf anywhere in `x` is an error.
pub fn select_topk(x: &[f32], k: usize, method: Method) -> Result<Vec<u32>, CompressError> {
    // On a pool thread, as in `compress_topk`.
    rayon::scope(|_| {
        let mut sweep = Sweep::Read(x);
        let mut out = Selection::default();
        select_sweep(&mut sweep, k, method, "gradient", &mut out)?;
        Ok(out.idx)
    })
}

/// Runs the passes of a selection over `sweep`: the first one applies its update (error
/// feedback), the later ones only read the updated values. `what` names the selected values
/// in errors. The caller has checked a stateful sweep's gradient for non-finite values, so a
/// non-finite value found here in that case means the accumulator overflowed. Returns the
/// selected indices (increasing) with their values in `out` (its memory reused).
pub(crate) fn select_sweep(
    sweep: &mut Sweep<'_>,
    k: usize,
    method: Method,
    what: &'static str,
    out: &mut Selection,
) -> Result<(), CompressError> {
    let n = sweep.len();
    if k > n || n > MAX_N {
        return Err(CompressError::BadK { k, n });
    }
    let mut passes = Passes {
        sweep,
        updated: false,
    };
    if k == 0 {
        // Nothing is sent, but the state still accumulates; only non-finite values pass.
        let bad = passes.collect(NONFINITE_KEY, 0.0)?;
        return match bad.find(|_| true) {
            Some((index, value)) => Err(CompressError::NonFinite {
                what,
                index: index as usize,
                value,
            }),
            None => {
                out.idx.clear();
                out.val.clear();
                Ok(())
            }
        };
    }
    let candidates = match method {
        Method::Exact => exact_candidates(&mut passes, k, what)?,
        Method::Sampled { seed, exact_k } => {
            match sampled_candidates(&mut passes, k, seed, exact_k)? {
                Some(c) => c,
                None => exact_candidates(&mut passes, k, what)?,
            }
        }
    };
    finish(candidates, k, what, out)
}

/// The first pass over a sweep updates its state; every later pass only reads.
struct Passes<'s, 'a> {
    sweep: &'s mut Sweep<'a>,
    updated: bool,
}

impl Passes<'_, '_> {
    fn len(&self) -> usize {
        self.sweep.len()
    }

    fn values(&self) -> &[f32] {
        self.sweep.values()
    }

    fn collect(&mut self, t: i32, expect_fraction: f64) -> Result<Candidates, CompressError> {
        if self.updated {
            return Ok(Sweep::Read(self.sweep.values())
                .collect(t, expect_fraction)
                .unwrap_or_default());
        }
        self.updated = true;
        let found = self.sweep.reborrow().collect(t, expect_fraction);
        found.map_err(|i| self.bad_gradient(i))
    }

    fn histogram(&mut self) -> Result<Vec<u64>, CompressError> {
        if self.updated {
            return Ok(Sweep::Read(self.sweep.values())
                .histogram()
                .unwrap_or_default());
        }
        self.updated = true;
        let found = self.sweep.reborrow().histogram();
        found.map_err(|i| self.bad_gradient(i))
    }

    /// The error for a non-finite gradient found (and undone) by the first pass.
    fn bad_gradient(&mut self, index: usize) -> CompressError {
        self.updated = false; // the update was rolled back
        CompressError::NonFinite {
            what: "gradient",
            index,
            value: self.sweep.grad_at(index).unwrap_or(f32::NAN),
        }
    }
}

fn nonfinite(what: &'static str, values: &[f32], index: u32) -> CompressError {
    let index = index as usize;
    CompressError::NonFinite {
        what,
        index,
        value: values.get(index).copied().unwrap_or(f32::NAN),
    }
}

/// Exact method: every index whose key is in or above the histogram bucket holding the k-th
/// largest key (k ≥ 1).
fn exact_candidates(
    passes: &mut Passes<'_, '_>,
    k: usize,
    what: &'static str,
) -> Result<Candidates, CompressError> {
    let hist = passes.histogram()?;
    let first_bad_bucket = (NONFINITE_KEY >> BUCKET_SHIFT) as usize;
    if hist[first_bad_bucket..].iter().any(|&c| c > 0) {
        let values = passes.values();
        let i = first_nonfinite(values).unwrap_or(0);
        return Err(nonfinite(what, values, i as u32));
    }
    let (mut bucket, mut at_or_above) = (BUCKETS, 0u64);
    while bucket > 0 && at_or_above < k as u64 {
        bucket -= 1;
        at_or_above += hist[bucket];
    }
    let t = (bucket as i32) << BUCKET_SHIFT;
    let fraction = at_or_above as f64 / passes.len() as f64;
    passes.collect(t, fraction)
}

/// Sampled method: candidates at or above a corrected sample threshold, or `None` when the
/// exact method should run instead (small n, a non-finite sample, or no success in time).
fn sampled_candidates(
    passes: &mut Passes<'_, '_>,
    k: usize,
    seed: u64,
    exact_k: bool,
) -> Result<Option<Candidates>, CompressError> {
    let n = passes.len();
    let sample_size = n.div_ceil(100).max((2 * n).div_ceil(k));
    if sample_size.saturating_mul(4) > n {
        return Ok(None); // sampling would read most of the array anyway
    }
    let sampled = SAMPLE.with_borrow_mut(|keys| {
        sample_keys(&passes.sweep.reborrow(), sample_size, seed, keys);
        if keys.iter().any(|&q| q >= NONFINITE_KEY) {
            return None; // the exact method reports the first non-finite index
        }
        // Aim a little below the sample's k-th quantile (three binomial standard deviations)
        // so the first pass usually yields enough candidates.
        let s = keys.len() as f64;
        let expected = k as f64 * s / n as f64;
        let rank = (expected + 3.0 * expected.sqrt() + 1.0).ceil() as usize;
        let t = if rank >= keys.len() {
            0
        } else {
            kth_largest(keys, rank)
        };
        release_if_large(keys);
        Some((t, rank, s))
    });
    let Some((mut t, rank, s)) = sampled else {
        return Ok(None);
    };
    let fraction = (rank as f64 / s).min(1.0);
    let cap = if exact_k {
        usize::MAX
    } else {
        (k as f64 * 1.3).ceil() as usize
    };
    let mut last = Candidates::default();
    for _ in 0..MAX_ROUNDS {
        let found = passes.collect(t, fraction)?;
        if (k..=cap).contains(&found.len()) {
            return Ok(Some(found));
        }
        t = if found.len() < k {
            scale_key(t, 0.8)
        } else {
            scale_key(t, 1.3)
        };
        last = found;
    }
    Ok((last.len() >= k).then_some(last))
}

/// The key of `|value(t)| · factor`, for threshold correction.
fn scale_key(t: i32, factor: f32) -> i32 {
    key(f32::from_bits(t as u32) * factor)
}

thread_local! {
    /// Scratch reused across calls on the same thread: large fresh allocations would cost a
    /// page fault per 4 KiB on every compression step.
    static SAMPLE: RefCell<Vec<i32>> = const { RefCell::new(Vec::new()) };
}

/// Scratch larger than this (elements) is freed after use rather than kept.
const KEEP_SCRATCH: usize = 1 << 22;

fn release_if_large<T>(v: &mut Vec<T>) {
    if v.capacity() > KEEP_SCRATCH {
        *v = Vec::new();
    }
}

/// The exact top-k among `candidates` (at least k of them, k ≥ 1), kept in increasing order.
fn finish(
    c: Candidates,
    k: usize,
    what: &'static str,
    out: &mut Selection,
) -> Result<(), CompressError> {
    let (lo, hi) = (c.lo, c.hi);
    // Every non-finite value is a candidate (its key is above any finite threshold).
    if hi >= NONFINITE_KEY {
        if let Some((index, value)) = c.find(|v| key(v) >= NONFINITE_KEY) {
            return Err(CompressError::NonFinite {
                what,
                index: index as usize,
                value,
            });
        }
    }
    if c.len() == k {
        c.into_selection(|_, _| true, out);
        return Ok(());
    }
    // Rank by (key descending, index ascending) as one u64 so all ranks are distinct; the
    // k-th largest is the cut, and filtering keeps the increasing order without a sort.
    let rank = |i: u32, v: f32| (u64::from(key(v) as u32) << 32) | u64::from(!i);
    // A histogram of the candidates' keys narrows the cut to one bucket; only that bucket's
    // ranks go through introselect.
    let span = (hi - lo) as u32;
    let shift = (32 - span.leading_zeros()).saturating_sub(CUT_BITS);
    let bucket = |v: f32| ((key(v) - lo) as u32 >> shift) as usize;
    let counts = c.histogram((span >> shift) as usize + 1, bucket);
    let (mut b, mut above) = (counts.len(), 0usize);
    while b > 0 && above + counts[b - 1] < k {
        b -= 1;
        above += counts[b];
    }
    let b = b.saturating_sub(1); // the bucket holding the k-th largest
    let mut ranks = c.gather(|i, v| (bucket(v) == b).then(|| rank(i, v)));
    let cut = *ranks
        .select_nth_unstable_by(k - above - 1, |x, y| y.cmp(x))
        .1;
    c.into_selection(|i, v| rank(i, v) >= cut, out);
    Ok(())
}

/// The `rank`-th largest (1-based, ≤ len) of non-negative `keys`: a histogram of their top
/// bits finds the bucket, introselect runs only inside it. Reorders `keys`.
fn kth_largest(keys: &mut [i32], rank: usize) -> i32 {
    let hi = keys.iter().fold(0i32, |m, &q| m.max(q)) as u32;
    let shift = (32 - hi.leading_zeros()).saturating_sub(CUT_BITS);
    let mut counts = vec![0usize; (hi >> shift) as usize + 1];
    for &q in keys.iter() {
        counts[(q as u32 >> shift) as usize] += 1;
    }
    let (mut b, mut above) = (counts.len(), 0usize);
    while b > 0 && above + counts[b - 1] < rank {
        b -= 1;
        above += counts[b];
    }
    let b = b.saturating_sub(1) as u32;
    let mut inside = 0;
    for j in 0..keys.len() {
        if keys[j] as u32 >> shift == b {
            keys.swap(inside, j);
            inside += 1;
        }
    }
    *keys[..inside]
        .select_nth_unstable_by(rank - above - 1, |x, y| y.cmp(x))
        .1
}

/// Bits of the candidate histograms in [`finish`] and [`kth_largest`].
const CUT_BITS: u32 = 12;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference: sort by (|x| desc, index asc), take k, sort indices.
    fn reference(x: &[f32], k: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..x.len() as u32).collect();
        order.sort_by(|&a, &b| {
            x[b as usize]
                .abs()
                .total_cmp(&x[a as usize].abs())
                .then(a.cmp(&b))
        });
        let mut top: Vec<u32> = order[..k].to_vec();
        top.sort_unstable();
        top
    }

    fn gaussianish(n: usize, seed: u64) -> Vec<f32> {
        // Sum of uniforms: cheap, bell-shaped, many distinct magnitudes.
        (0..n as u64)
            .map(|i| {
                (0..4)
                    .map(|j| super::super::rng::uniform(seed, 4 * i + j) - 0.5)
                    .sum::<f32>()
            })
            .collect()
    }

    const SAMPLED: Method = Method::Sampled {
        seed: 3,
        exact_k: true,
    };

    #[test]
    fn exact_and_sampled_match_reference_on_many_sizes() {
        for &n in &[1usize, 2, 3, 15, 16, 17, 100, 1000, 65_536, 65_537, 140_001] {
            let x = gaussianish(n, n as u64);
            for &k in &[1usize, 2, n / 3, n / 2, n.saturating_sub(1), n] {
                if k == 0 || k > n {
                    continue;
                }
                let want = reference(&x, k);
                assert_eq!(
                    select_topk(&x, k, Method::Exact).unwrap(),
                    want,
                    "exact n={n} k={k}"
                );
                assert_eq!(
                    select_topk(&x, k, SAMPLED).unwrap(),
                    want,
                    "sampled n={n} k={k}"
                );
            }
        }
    }

    #[test]
    fn sampled_path_really_samples_and_matches_exact() {
        let x = gaussianish(1_000_000, 11);
        for &k in &[1_000usize, 10_000] {
            let want = reference(&x, k);
            assert_eq!(select_topk(&x, k, SAMPLED).unwrap(), want);
        }
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let x = vec![1.0f32; 10];
        assert_eq!(select_topk(&x, 3, Method::Exact).unwrap(), vec![0, 1, 2]);
        let mut y = vec![0.5f32; 200_000];
        y[7] = -2.0;
        y[199_999] = 2.0;
        for m in [Method::Exact, SAMPLED] {
            assert_eq!(select_topk(&y, 4, m).unwrap(), vec![0, 1, 7, 199_999]);
        }
        // -x and x have the same magnitude
        assert_eq!(
            select_topk(&[-3.0, 3.0, 1.0], 1, Method::Exact).unwrap(),
            vec![0]
        );
    }

    #[test]
    fn nonfinite_is_an_error_naming_the_first_index() {
        let mut x = gaussianish(200_000, 5);
        x[123_456] = f32::NAN;
        x[150_000] = f32::INFINITY;
        for m in [Method::Exact, SAMPLED] {
            match select_topk(&x, 100, m) {
                Err(CompressError::NonFinite { index, .. }) => assert_eq!(index, 123_456),
                other => panic!("{other:?}"),
            }
        }
        assert!(select_topk(&[f32::NEG_INFINITY], 1, Method::Exact).is_err());
    }

    #[test]
    fn kth_largest_matches_sorting() {
        let mut keys: Vec<i32> = gaussianish(50_000, 4).iter().map(|&v| key(v)).collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        for rank in [1usize, 2, 17, 500, 25_000, 49_999, 50_000] {
            assert_eq!(
                kth_largest(&mut keys, rank),
                sorted[rank - 1],
                "rank {rank}"
            );
        }
        assert_eq!(kth_largest(&mut [0, 0, 0], 2), 0);
    }

    /// Values on a coarse grid: the threshold and the k-th largest land on long runs of
    /// equal magnitudes, of both signs.
    fn quantized(n: usize, seed: u64) -> Vec<f32> {
        gaussianish(n, seed)
            .iter()
            .map(|&v| (v * 16.0).round() / 16.0)
            .collect()
    }

    #[test]
    fn threshold_on_ties_matches_reference_serial_and_parallel_finish() {
        use super::super::scan::{PAR_CANDIDATES, TASK};
        // n not a multiple of the task size; k small (serial finish, about 1.1·k candidates)
        // and large enough that the candidates exceed PAR_CANDIDATES (parallel finish).
        let n = 7 * TASK + 4_097;
        let x = quantized(n, 21);
        for k in [n / 100, PAR_CANDIDATES + 12_345] {
            let want = reference(&x, k);
            // The k-th largest magnitude is shared by entries kept and entries dropped.
            let kth = want
                .iter()
                .map(|&i| x[i as usize].abs())
                .fold(f32::MAX, f32::min);
            let kept = want.iter().filter(|&&i| x[i as usize].abs() == kth).count();
            assert!(x.iter().filter(|v| v.abs() == kth).count() > kept);
            for m in [Method::Exact, SAMPLED] {
                assert_eq!(select_topk(&x, k, m).unwrap(), want, "{m:?} k={k}");
            }
        }
    }

    #[test]
    fn bad_k_is_an_error() {
        assert!(matches!(
            select_topk(&[1.0, 2.0], 3, Method::Exact),
            Err(CompressError::BadK { k: 3, n: 2 })
        ));
        assert_eq!(
            select_topk(&[1.0, 2.0], 0, Method::Exact).unwrap(),
            Vec::<u32>::new()
        );
        assert_eq!(select_topk(&[], 0, SAMPLED).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn loose_k_stays_within_bounds() {
        let x = gaussianish(1_000_000, 9);
        let k = 10_000;
        let got = select_topk(
            &x,
            k,
            Method::Sampled {
                seed: 1,
                exact_k: false,
            },
        )
        .unwrap();
        assert!(got.len() >= k && got.len() <= 13_000, "{}", got.len());
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        // every entry of the exact top-k is included (the threshold is below the k-th)
        let exact = reference(&x, k);
        let set: std::collections::HashSet<u32> = got.iter().copied().collect();
        assert!(exact.iter().all(|i| set.contains(i)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn prop_matches_reference(
            x in proptest::collection::vec(
                prop_oneof![-4.0f32..4.0, Just(0.0f32), Just(1.0f32), Just(-1.0f32)], 1..3000),
            kf in 0.0f64..1.0,
            seed in any::<u64>(),
        ) {
            let k = ((x.len() as f64 * kf) as usize).max(1);
            let want = reference(&x, k);
            prop_assert_eq!(select_topk(&x, k, Method::Exact).unwrap(), want.clone());
            let m = Method::Sampled { seed, exact_k: true };
            prop_assert_eq!(select_topk(&x, k, m).unwrap(), want);
        }
    }
}
