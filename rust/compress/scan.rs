//! The memory-bound sweeps of selection: one pass over the gradient (and the error-feedback
//! state, updated in the same pass) that feeds every updated value to a sink — a threshold
//! collector or a histogram. Parallel over fixed-size tasks whose results are concatenated in
//! order, so the outcome never depends on the number of threads.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::collect::{collect_run, Level};
use super::pieces::Pieces;
use super::rng::mix64;

/// Magnitude keys at or above this are NaN or ±inf.
pub(crate) const NONFINITE_KEY: i32 = 0x7f80_0000;
/// Elements per parallel task: large enough to amortise scheduling, small enough that two
/// cores shared with other work still balance.
pub(crate) const TASK: usize = 1 << 16;
/// Histogram buckets: the top 11 of the key's 31 bits (8 exponent + 3 mantissa bits).
pub(crate) const BUCKETS: usize = 2048;
pub(crate) const BUCKET_SHIFT: u32 = 20;
const BLOCK: usize = 16;
/// Consecutive entries per sample run (512 bytes).
const SAMPLE_RUN: usize = 128;

/// The magnitude key of `x`: its bits with the sign cleared. Orders finite values by |x| and
/// puts ±inf and every NaN above all finite values.
#[inline(always)]
pub(crate) fn key(x: f32) -> i32 {
    (x.to_bits() & 0x7fff_ffff) as i32
}

/// The gradient of an accumulating sweep: one slice, or pieces read in place.
#[derive(Clone, Copy)]
pub(crate) enum Grad<'a> {
    Flat(&'a [f32]),
    Pieces(&'a Pieces<'a>),
}

impl Grad<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Grad::Flat(x) => x.len(),
            Grad::Pieces(p) => p.len(),
        }
    }

    pub(crate) fn get(&self, i: usize) -> Option<f32> {
        match self {
            Grad::Flat(x) => x.get(i).copied(),
            Grad::Pieces(p) => (i < p.len()).then(|| p.at(i)),
        }
    }

    /// [`Pieces::for_range`] for either kind.
    pub(crate) fn for_range(&self, lo: usize, hi: usize, mut f: impl FnMut(&[f32], usize) -> bool) {
        match self {
            Grad::Flat(x) => {
                if lo < hi {
                    f(&x[lo..hi], lo);
                }
            }
            Grad::Pieces(p) => p.for_range(lo, hi, f),
        }
    }

    pub(crate) fn first_nonfinite(&self) -> Option<usize> {
        match self {
            Grad::Flat(x) => first_nonfinite(x),
            Grad::Pieces(p) => {
                let mut found = None;
                p.for_range(0, p.len(), |run, start| {
                    found = first_nonfinite(run).map(|i| start + i);
                    found.is_none()
                });
                found
            }
        }
    }
}

/// What a sweep reads and, with error feedback, updates in place.
pub(crate) enum Sweep<'a> {
    /// Select on `x` as it is.
    Read(&'a [f32]),
    /// `acc ← acc + grad`, select on the new `acc`.
    Accumulate { grad: Grad<'a>, acc: &'a mut [f32] },
    /// `u ← m·u + grad; v ← v + u`, select on the new `v`.
    Momentum {
        grad: &'a [f32],
        u: &'a mut [f32],
        v: &'a mut [f32],
        m: f32,
    },
}

/// Receives the values a sweep produces, one run of consecutive entries at a time.
pub(crate) trait Sink: Send {
    /// Feeds all of `x`, whose first element has index `base`.
    fn run(&mut self, x: &[f32], base: usize);
}

/// Collects, in increasing order, the indices whose key is ≥ `t`, with their values (so
/// that finishing the selection never goes back to the large array). Branch-free (see
/// [`collect_run`]).
pub(crate) struct Collect {
    t: i32,
    /// Largest key collected (so the selection need not scan for it).
    hi: i32,
    level: Level,
    pub(crate) idx: Vec<u32>,
    pub(crate) val: Vec<f32>,
}

/// Bit j set iff `key(vals[j]) >= t` (t ≥ 0).
#[inline(always)]
fn mask16(vals: &[f32; BLOCK], t: i32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_and_si128, _mm_castsi128_ps, _mm_cmpgt_epi32, _mm_loadu_si128,
            _mm_movemask_ps, _mm_set1_epi32,
        };
        // SAFETY: SSE2 is in the x86_64 baseline, so these intrinsics are available; each
        // unaligned load reads floats 4q..4q+4 of the 16-float array `vals`.
        unsafe {
            let abs = _mm_set1_epi32(0x7fff_ffff);
            // keys are ≥ 0 and t ≥ 0, so the signed `key > t − 1` is `key ≥ t`.
            let below = _mm_set1_epi32(t.wrapping_sub(1));
            let mut mask = 0u32;
            for q in 0..BLOCK / 4 {
                let v = _mm_loadu_si128(vals.as_ptr().add(4 * q).cast::<__m128i>());
                let hit = _mm_cmpgt_epi32(_mm_and_si128(v, abs), below);
                mask |= (_mm_movemask_ps(_mm_castsi128_ps(hit)) as u32) << (4 * q);
            }
            mask
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut mask = 0u32;
        for (j, &x) in vals.iter().enumerate() {
            mask |= u32::from(key(x) >= t) << j;
        }
        mask
    }
}

impl Sink for Collect {
    #[inline(always)]
    fn run(&mut self, x: &[f32], base: usize) {
        // Indices fit in u32: n ≤ MAX_N is checked before any sweep.
        collect_run(
            self.level,
            x,
            base as u32,
            self.t,
            &mut self.idx,
            &mut self.val,
            &mut self.hi,
        );
    }
}

/// Counts keys per bucket; four interleaved tables so runs of equal buckets do not serialise
/// on one counter.
pub(crate) struct Histogram {
    counts: Vec<[u32; 4]>,
}

impl Sink for Histogram {
    #[inline(always)]
    fn run(&mut self, x: &[f32], _base: usize) {
        for (j, &x) in x.iter().enumerate() {
            let b = (key(x) >> BUCKET_SHIFT) as usize & (BUCKETS - 1);
            self.counts[b][j & 3] += 1;
        }
    }
}

impl Sweep<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Sweep::Read(x) => x.len(),
            Sweep::Accumulate { grad, .. } => grad.len(),
            Sweep::Momentum { grad, .. } => grad.len(),
        }
    }

    /// Element `i` of the gradient (of the array itself for a plain read).
    pub(crate) fn grad_at(&self, i: usize) -> Option<f32> {
        match self {
            Sweep::Read(x) => x.get(i).copied(),
            Sweep::Accumulate { grad, .. } => grad.get(i),
            Sweep::Momentum { grad, .. } => grad.get(i).copied(),
        }
    }

    /// The values selection ranks once the sweep has run: `x`, the accumulator, or `v`.
    pub(crate) fn values(&self) -> &[f32] {
        match self {
            Sweep::Read(x) => x,
            Sweep::Accumulate { acc, .. } => acc,
            Sweep::Momentum { v, .. } => v,
        }
    }

    /// The same sweep over shorter borrows, so it can be driven without being consumed.
    pub(crate) fn reborrow(&mut self) -> Sweep<'_> {
        match self {
            Sweep::Read(x) => Sweep::Read(x),
            Sweep::Accumulate { grad, acc } => Sweep::Accumulate { grad: *grad, acc },
            Sweep::Momentum { grad, u, v, m } => Sweep::Momentum { grad, u, v, m: *m },
        }
    }

    /// Runs the sweep (updating the state once) and returns one sink per task, in order.
    ///
    /// An accumulating sweep checks each sub-block of the gradient for NaN/±inf before adding
    /// it; on one, every task stops and every sub-block already added is subtracted again
    /// (`acc + g − g`, the old value up to float32 rounding; sub-blocks holding the bad value
    /// are never touched), and the result is `Err(first non-finite index of the gradient)`.
    fn drive<S: Sink, F: Fn(usize) -> S + Sync>(self, make: F) -> Result<Vec<S>, usize> {
        let n = self.len();
        let stop = AtomicBool::new(false);
        match self {
            Sweep::Read(x) if n <= TASK => {
                let mut sink = make(n);
                read_task(x, 0, &mut sink);
                Ok(vec![sink])
            }
            Sweep::Read(x) => Ok(x
                .par_chunks(TASK)
                .enumerate()
                .map(|(t, x)| {
                    let mut sink = make(x.len());
                    read_task(x, t * TASK, &mut sink);
                    sink
                })
                .collect()),
            Sweep::Accumulate { grad, acc } => {
                // A task's part of the gradient may span several pieces: each run of it
                // goes through the same sink, in order. `done` is the prefix of the task
                // already added when it stopped.
                let run = |t: usize, acc: &mut [f32]| {
                    let lo = t * TASK;
                    let mut sink = make(acc.len());
                    let (mut done, mut bad) = (0usize, false);
                    grad.for_range(lo, lo + acc.len(), |g, at| {
                        let a = &mut acc[at - lo..at - lo + g.len()];
                        let (d, b) = accumulate_task(g, a, at, &mut sink, &stop);
                        done += d;
                        bad |= b;
                        !b && d == g.len()
                    });
                    (sink, done, bad)
                };
                let parts: Vec<(S, usize, bool)> = if n <= TASK {
                    vec![run(0, acc)]
                } else {
                    acc.par_chunks_mut(TASK)
                        .enumerate()
                        .map(|(t, acc)| run(t, acc))
                        .collect()
                };
                if !parts.iter().any(|p| p.2) {
                    return Ok(parts.into_iter().map(|p| p.0).collect());
                }
                let done: Vec<usize> = parts.iter().map(|p| p.1).collect();
                acc.par_chunks_mut(TASK)
                    .zip(done.par_iter())
                    .enumerate()
                    .for_each(|(t, (acc, &done))| {
                        let lo = t * TASK;
                        grad.for_range(lo, lo + done, |g, at| {
                            for (a, &g) in acc[at - lo..at - lo + g.len()].iter_mut().zip(g) {
                                *a -= g;
                            }
                            true
                        });
                    });
                Err(grad.first_nonfinite().unwrap_or(0))
            }
            Sweep::Momentum { grad, u, v, m } if n <= TASK => {
                let mut sink = make(n);
                momentum_task(grad, u, v, m, 0, &mut sink);
                Ok(vec![sink])
            }
            Sweep::Momentum { grad, u, v, m } => Ok(u
                .par_chunks_mut(TASK)
                .zip(v.par_chunks_mut(TASK))
                .zip(grad.par_chunks(TASK))
                .enumerate()
                .map(|(t, ((u, v), grad))| {
                    let mut sink = make(grad.len());
                    momentum_task(grad, u, v, m, t * TASK, &mut sink);
                    sink
                })
                .collect()),
        }
    }

    /// Runs the sweep and returns, in increasing order, every index whose updated value has a
    /// key ≥ `t`, with those values. `expect_fraction` sizes the buffers.
    pub(crate) fn collect(self, t: i32, expect_fraction: f64) -> Result<Candidates, usize> {
        let level = Level::detect();
        let parts = self.drive(|len| {
            // Room for the expected hits and the collector's overhang, so that a typical
            // task never reallocates.
            let cap = (len as f64 * expect_fraction * 1.25) as usize + 1024;
            Collect {
                t,
                hi: 0,
                level,
                idx: Vec::with_capacity(cap),
                val: Vec::with_capacity(cap),
            }
        })?;
        Ok(Candidates::from_parts(parts))
    }

    /// Runs the sweep and returns the histogram of the updated values' keys (errors as
    /// [`Sweep::collect`]).
    pub(crate) fn histogram(self) -> Result<Vec<u64>, usize> {
        let parts = self.drive(|_| Histogram {
            counts: vec![[0; 4]; BUCKETS],
        })?;
        let mut total = vec![0u64; BUCKETS];
        for part in parts {
            for (t, c) in total.iter_mut().zip(&part.counts) {
                *t += c.iter().map(|&c| u64::from(c)).sum::<u64>();
            }
        }
        Ok(total)
    }
}

/// Below this many candidates the selection's finishing passes run on one thread.
pub(crate) const PAR_CANDIDATES: usize = 1 << 15;

/// Entries of a sweep at or above a threshold, increasing, as the per-task lists the sweep
/// produced (not concatenated: the selection reads them once more and keeps k).
#[derive(Default)]
pub(crate) struct Candidates {
    parts: Vec<Collect>,
    len: usize,
    /// Every candidate's key is in `lo..=hi`.
    pub(crate) lo: i32,
    pub(crate) hi: i32,
}

/// The outcome of a selection: increasing indices and their values.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Selection {
    pub(crate) idx: Vec<u32>,
    pub(crate) val: Vec<f32>,
}

impl Selection {
    /// Makes both lists `len` long, keeping old contents (about to be overwritten): zeroing
    /// memory that is written next would cost a pass over it.
    fn set_len(&mut self, len: usize) {
        self.idx.resize(len, 0);
        self.val.resize(len, 0.0);
    }
}

impl Candidates {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first pair for which `bad` holds.
    pub(crate) fn find(&self, bad: impl Fn(f32) -> bool) -> Option<(u32, f32)> {
        self.parts.iter().find_map(|c| {
            c.val
                .iter()
                .position(|&v| bad(v))
                .map(|j| (c.idx[j], c.val[j]))
        })
    }

    /// Whether the finishing passes are worth spreading over threads.
    fn parallel(&self) -> bool {
        self.len >= PAR_CANDIDATES
    }

    /// `f(index, value)` of every pair for which it is `Some`, in no particular order
    /// (parallel over parts).
    pub(crate) fn gather<T: Send>(&self, f: impl Fn(u32, f32) -> Option<T> + Sync) -> Vec<T> {
        let part = |c: &Collect| -> Vec<T> {
            c.idx
                .iter()
                .zip(&c.val)
                .filter_map(|(&i, &v)| f(i, v))
                .collect()
        };
        if !self.parallel() {
            return self.parts.iter().flat_map(part).collect();
        }
        let pieces: Vec<Vec<T>> = self.parts.par_iter().map(part).collect();
        pieces.into_iter().flatten().collect()
    }

    /// The pairs for which `keep` holds, in increasing index order, into `out` (replacing
    /// its contents, reusing its memory), branch-free. Below [`PAR_CANDIDATES`] in one
    /// serial pass; from there, each part is filtered in place, then the parts are copied into the
    /// result at their offsets, both in parallel over parts.
    pub(crate) fn into_selection(
        mut self,
        keep: impl Fn(u32, f32) -> bool + Sync,
        out: &mut Selection,
    ) {
        if !self.parallel() {
            // One pass: every pair is stored at the cursor, which advances past the kept ones.
            out.set_len(self.len);
            let mut kept = 0;
            for c in &self.parts {
                for (&i, &v) in c.idx.iter().zip(&c.val) {
                    out.idx[kept] = i;
                    out.val[kept] = v;
                    kept += usize::from(keep(i, v));
                }
            }
            out.idx.truncate(kept);
            out.val.truncate(kept);
            return;
        }
        let filter = |c: &mut Collect| {
            let mut kept = 0;
            for r in 0..c.idx.len() {
                let (i, v) = (c.idx[r], c.val[r]);
                c.idx[kept] = i;
                c.val[kept] = v;
                kept += usize::from(keep(i, v));
            }
            c.idx.truncate(kept);
            c.val.truncate(kept);
        };
        self.parts.par_iter_mut().for_each(filter);
        let total: usize = self.parts.iter().map(|c| c.idx.len()).sum();
        out.set_len(total);
        // Disjoint destination slices, one per part, in order.
        let mut dst = Vec::with_capacity(self.parts.len());
        let (mut idx, mut val) = (&mut out.idx[..], &mut out.val[..]);
        for c in &self.parts {
            let (i, rest_i) = std::mem::take(&mut idx).split_at_mut(c.idx.len());
            let (v, rest_v) = std::mem::take(&mut val).split_at_mut(c.val.len());
            dst.push((i, v, c));
            (idx, val) = (rest_i, rest_v);
        }
        let copy = |(i, v, c): (&mut [u32], &mut [f32], &Collect)| {
            i.copy_from_slice(&c.idx);
            v.copy_from_slice(&c.val);
        };
        dst.into_par_iter().for_each(copy);
    }

    fn from_parts(parts: Vec<Collect>) -> Self {
        let len = parts.iter().map(|c| c.idx.len()).sum();
        let lo = parts.first().map_or(0, |c| c.t);
        let hi = parts.iter().fold(lo, |m, c| m.max(c.hi));
        Candidates { parts, len, lo, hi }
    }

    /// Counts of `bucket(value)` over all pairs (buckets < `buckets`), in parallel over parts.
    pub(crate) fn histogram(
        &self,
        buckets: usize,
        bucket: impl Fn(f32) -> usize + Sync,
    ) -> Vec<usize> {
        let count = |acc: Vec<usize>, c: &Collect| {
            let mut acc = acc;
            for &v in &c.val {
                acc[bucket(v)] += 1;
            }
            acc
        };
        if self.len < PAR_CANDIDATES {
            return self.parts.iter().fold(vec![0; buckets], count);
        }
        self.parts
            .par_iter()
            .with_min_len(self.parts.len().div_ceil(4))
            .fold(|| vec![0; buckets], count)
            .reduce(
                || vec![0; buckets],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    }
}

#[inline(always)]
fn read_task<S: Sink>(x: &[f32], base: usize, sink: &mut S) {
    sink.run(x, base);
}

/// Elements updated per sub-block before they are read back for the sink: small enough to
/// stay in L1, so the update and the selection still make a single pass over memory.
const SUB: usize = 1024;

/// Adds `grad` into `acc` sub-block by sub-block, feeding the sums to `sink`, unless a
/// sub-block of `grad` holds NaN/±inf (then it raises `stop` and returns) or another task
/// raised `stop`. Returns how many leading elements were added and whether it found one.
#[inline(always)]
fn accumulate_task<S: Sink>(
    grad: &[f32],
    acc: &mut [f32],
    base: usize,
    sink: &mut S,
    stop: &AtomicBool,
) -> (usize, bool) {
    let mut done = 0;
    for (j, (g, a)) in grad.chunks(SUB).zip(acc.chunks_mut(SUB)).enumerate() {
        if stop.load(Ordering::Relaxed) {
            return (done, false);
        }
        if has_nonfinite(g) {
            stop.store(true, Ordering::Relaxed);
            return (done, true);
        }
        // Plain element-wise loops vectorise; the sink then reads the block from L1.
        for (a, &g) in a.iter_mut().zip(g) {
            *a += g;
        }
        read_task(a, base + j * SUB, sink);
        done += g.len();
    }
    (done, false)
}

/// Whether `x` holds NaN or ±inf (branch-free over blocks of 16).
#[inline(always)]
fn has_nonfinite(x: &[f32]) -> bool {
    let mut blocks = x.chunks_exact(BLOCK);
    let mut any = 0u32;
    for blk in blocks.by_ref() {
        if let Ok(vals) = <&[f32; BLOCK]>::try_from(blk) {
            any |= mask16(vals, NONFINITE_KEY);
        }
    }
    any != 0 || blocks.remainder().iter().any(|&v| key(v) >= NONFINITE_KEY)
}

#[inline(always)]
fn momentum_task<S: Sink>(
    grad: &[f32],
    u: &mut [f32],
    v: &mut [f32],
    m: f32,
    base: usize,
    sink: &mut S,
) {
    let blocks = grad
        .chunks(SUB)
        .zip(u.chunks_mut(SUB))
        .zip(v.chunks_mut(SUB));
    for (j, ((g, u), v)) in blocks.enumerate() {
        for ((u, v), &g) in u.iter_mut().zip(v.iter_mut()).zip(g) {
            *u = m * *u + g;
            *v += *u;
        }
        read_task(v, base + j * SUB, sink);
    }
}

/// The first index of `x` holding NaN or ±inf, if any (parallel, read-only).
pub(crate) fn first_nonfinite(x: &[f32]) -> Option<usize> {
    fn in_task(x: &[f32], base: usize) -> Option<usize> {
        let mut blocks = x.chunks_exact(BLOCK);
        let mut at = base;
        for blk in blocks.by_ref() {
            let bad = match <&[f32; BLOCK]>::try_from(blk) {
                Ok(vals) => mask16(vals, NONFINITE_KEY),
                Err(_) => 0,
            };
            if bad != 0 {
                return Some(at + bad.trailing_zeros() as usize);
            }
            at += BLOCK;
        }
        blocks
            .remainder()
            .iter()
            .position(|&v| key(v) >= NONFINITE_KEY)
            .map(|j| at + j)
    }
    if x.len() <= TASK {
        return in_task(x, 0);
    }
    x.par_chunks(TASK)
        .enumerate()
        .find_map_first(|(t, c)| in_task(c, t * TASK))
}

/// Keys of a strided sample of about `s` values produced by `sweep` (not updating it), into
/// `out`: runs of [`SAMPLE_RUN`] consecutive entries, one per stride, at an offset drawn from
/// `seed`. Runs of several cache lines let the prefetcher work; thousands of runs spread over
/// the whole array still see every region of it.
pub(crate) fn sample_keys(sweep: &Sweep<'_>, s: usize, seed: u64, out: &mut Vec<i32>) {
    let n = sweep.len();
    let blocks = s.div_ceil(SAMPLE_RUN).clamp(1, (n / SAMPLE_RUN).max(1));
    let stride = n / blocks;
    let span = SAMPLE_RUN.min(stride);
    let offset = (mix64(seed) % (stride - span + 1) as u64) as usize;
    out.clear();
    out.resize(blocks * span, 0);
    // One closure per kind of sweep, so the per-element work is not an enum dispatch.
    match sweep {
        Sweep::Read(x) => fill_sample(out, span, stride, offset, |i| x[i]),
        Sweep::Accumulate {
            grad: Grad::Flat(grad),
            acc,
        } => fill_sample(out, span, stride, offset, |i| acc[i] + grad[i]),
        Sweep::Accumulate {
            grad: Grad::Pieces(p),
            acc,
        } => fill_sample(out, span, stride, offset, |i| acc[i] + p.at(i)),
        Sweep::Momentum { grad, u, v, m } => {
            fill_sample(out, span, stride, offset, |i| v[i] + (*m * u[i] + grad[i]))
        }
    }
}

fn fill_sample<F: Fn(usize) -> f32 + Sync>(
    out: &mut [i32],
    span: usize,
    stride: usize,
    offset: usize,
    value: F,
) {
    let fill = |b: usize, dst: &mut [i32]| {
        let start = b * stride + offset;
        for (d, i) in dst.iter_mut().zip(start..start + span) {
            *d = key(value(i));
        }
    };
    if out.len() < TASK {
        out.chunks_mut(span)
            .enumerate()
            .for_each(|(b, dst)| fill(b, dst));
    } else {
        out.par_chunks_mut(span)
            .with_min_len(TASK / span)
            .enumerate()
            .for_each(|(b, dst)| fill(b, dst));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_nonfinite_is_a_global_index() {
        let (a, b) = ([1.0f32; 40], [1.0f32, 2.0, f32::NAN, f32::INFINITY]);
        let parts: [&[f32]; 2] = [&a, &b];
        let p = Pieces::new(&parts);
        assert_eq!(Grad::Pieces(&p).first_nonfinite(), Some(42));
        assert_eq!(Grad::Pieces(&p).get(41), Some(2.0));
        assert_eq!(Grad::Pieces(&p).get(44), None);
    }
}
