//! The memory-bound sweeps of selection: one pass over the gradient (and the error-feedback
//! state, updated in the same pass) that feeds every updated value to a sink — a threshold
//! collector or a histogram. Parallel over fixed-size tasks whose results are concatenated in
//! order, so the outcome never depends on the number of threads.

use rayon::prelude::*;

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

/// The magnitude key of `x`: its bits with the sign cleared. Orders finite values by |x| and
/// puts ±inf and every NaN above all finite values.
#[inline(always)]
pub(crate) fn key(x: f32) -> i32 {
    (x.to_bits() & 0x7fff_ffff) as i32
}

/// What a sweep reads and, with error feedback, updates in place.
pub(crate) enum Sweep<'a> {
    /// Select on `x` as it is.
    Read(&'a [f32]),
    /// `acc ← acc + grad`, select on the new `acc`.
    Accumulate { grad: &'a [f32], acc: &'a mut [f32] },
    /// `u ← m·u + grad; v ← v + u`, select on the new `v`.
    Momentum {
        grad: &'a [f32],
        u: &'a mut [f32],
        v: &'a mut [f32],
        m: f32,
    },
}

/// Receives the values a sweep produces, 16 at a time (then a shorter tail).
pub(crate) trait Sink: Send {
    fn block(&mut self, base: usize, vals: &[f32; BLOCK]);
    fn tail(&mut self, base: usize, vals: &[f32]);
}

/// Collects, in increasing order, the indices whose key is ≥ `t`.
pub(crate) struct Collect {
    t: i32,
    pub(crate) out: Vec<u32>,
}

impl Sink for Collect {
    #[inline(always)]
    fn block(&mut self, base: usize, vals: &[f32; BLOCK]) {
        // Branch-free mask first (vectorises), then one branch per 16 values.
        let mut mask = 0u32;
        for (j, &x) in vals.iter().enumerate() {
            mask |= u32::from(key(x) >= self.t) << j;
        }
        while mask != 0 {
            let j = mask.trailing_zeros() as usize;
            self.out.push((base + j) as u32);
            mask &= mask - 1;
        }
    }

    fn tail(&mut self, base: usize, vals: &[f32]) {
        for (j, &x) in vals.iter().enumerate() {
            if key(x) >= self.t {
                self.out.push((base + j) as u32);
            }
        }
    }
}

/// Counts keys per bucket; four interleaved tables so runs of equal buckets do not serialise
/// on one counter.
pub(crate) struct Histogram {
    counts: Vec<[u32; 4]>,
}

impl Sink for Histogram {
    #[inline(always)]
    fn block(&mut self, _base: usize, vals: &[f32; BLOCK]) {
        for (j, &x) in vals.iter().enumerate() {
            let b = (key(x) >> BUCKET_SHIFT) as usize & (BUCKETS - 1);
            self.counts[b][j & 3] += 1;
        }
    }

    fn tail(&mut self, _base: usize, vals: &[f32]) {
        for &x in vals {
            let b = (key(x) >> BUCKET_SHIFT) as usize & (BUCKETS - 1);
            self.counts[b][0] += 1;
        }
    }
}

impl Sweep<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Sweep::Read(x) => x.len(),
            Sweep::Accumulate { grad, .. } | Sweep::Momentum { grad, .. } => grad.len(),
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
            Sweep::Accumulate { grad, acc } => Sweep::Accumulate { grad, acc },
            Sweep::Momentum { grad, u, v, m } => Sweep::Momentum { grad, u, v, m: *m },
        }
    }

    /// The value the sweep would produce at `i`, without updating anything.
    #[inline]
    pub(crate) fn peek(&self, i: usize) -> f32 {
        match self {
            Sweep::Read(x) => x[i],
            Sweep::Accumulate { grad, acc } => acc[i] + grad[i],
            Sweep::Momentum { grad, u, v, m } => v[i] + (*m * u[i] + grad[i]),
        }
    }

    /// Runs the sweep (updating the state once) and returns one sink per task, in order.
    fn drive<S: Sink, F: Fn(usize) -> S + Sync>(self, make: F) -> Vec<S> {
        let n = self.len();
        if n <= TASK {
            let mut sink = make(n);
            match self {
                Sweep::Read(x) => read_task(x, 0, &mut sink),
                Sweep::Accumulate { grad, acc } => accumulate_task(grad, acc, 0, &mut sink),
                Sweep::Momentum { grad, u, v, m } => momentum_task(grad, u, v, m, 0, &mut sink),
            }
            return vec![sink];
        }
        match self {
            Sweep::Read(x) => x
                .par_chunks(TASK)
                .enumerate()
                .map(|(t, x)| {
                    let mut sink = make(x.len());
                    read_task(x, t * TASK, &mut sink);
                    sink
                })
                .collect(),
            Sweep::Accumulate { grad, acc } => acc
                .par_chunks_mut(TASK)
                .zip(grad.par_chunks(TASK))
                .enumerate()
                .map(|(t, (acc, grad))| {
                    let mut sink = make(grad.len());
                    accumulate_task(grad, acc, t * TASK, &mut sink);
                    sink
                })
                .collect(),
            Sweep::Momentum { grad, u, v, m } => u
                .par_chunks_mut(TASK)
                .zip(v.par_chunks_mut(TASK))
                .zip(grad.par_chunks(TASK))
                .enumerate()
                .map(|(t, ((u, v), grad))| {
                    let mut sink = make(grad.len());
                    momentum_task(grad, u, v, m, t * TASK, &mut sink);
                    sink
                })
                .collect(),
        }
    }

    /// Runs the sweep and returns, in increasing order, every index whose updated value has a
    /// key ≥ `t`. `expect_fraction` sizes the buffers.
    pub(crate) fn collect(self, t: i32, expect_fraction: f64) -> Vec<u32> {
        let parts = self.drive(|len| Collect {
            t,
            out: Vec::with_capacity((len as f64 * expect_fraction * 1.25) as usize + 64),
        });
        concat(parts.into_iter().map(|c| c.out))
    }

    /// Runs the sweep and returns the histogram of the updated values' keys.
    pub(crate) fn histogram(self) -> Vec<u64> {
        let parts = self.drive(|_| Histogram {
            counts: vec![[0; 4]; BUCKETS],
        });
        let mut total = vec![0u64; BUCKETS];
        for part in parts {
            for (t, c) in total.iter_mut().zip(&part.counts) {
                *t += c.iter().map(|&c| u64::from(c)).sum::<u64>();
            }
        }
        total
    }
}

fn concat(parts: impl Iterator<Item = Vec<u32>>) -> Vec<u32> {
    let parts: Vec<Vec<u32>> = parts.collect();
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for p in parts {
        out.extend_from_slice(&p);
    }
    out
}

#[inline(always)]
fn read_task<S: Sink>(x: &[f32], base: usize, sink: &mut S) {
    let mut blocks = x.chunks_exact(BLOCK);
    let mut at = base;
    for blk in blocks.by_ref() {
        let mut vals = [0f32; BLOCK];
        vals.copy_from_slice(blk);
        sink.block(at, &vals);
        at += BLOCK;
    }
    sink.tail(at, blocks.remainder());
}

#[inline(always)]
fn accumulate_task<S: Sink>(grad: &[f32], acc: &mut [f32], base: usize, sink: &mut S) {
    let mut gs = grad.chunks_exact(BLOCK);
    let mut accs = acc.chunks_exact_mut(BLOCK);
    let mut at = base;
    for (g, a) in gs.by_ref().zip(accs.by_ref()) {
        let mut vals = [0f32; BLOCK];
        for ((s, a), &g) in vals.iter_mut().zip(a.iter_mut()).zip(g) {
            *s = *a + g;
            *a = *s;
        }
        sink.block(at, &vals);
        at += BLOCK;
    }
    let (g, a) = (gs.remainder(), accs.into_remainder());
    for (a, &g) in a.iter_mut().zip(g) {
        *a += g;
    }
    sink.tail(at, a);
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
    let mut gs = grad.chunks_exact(BLOCK);
    let mut us = u.chunks_exact_mut(BLOCK);
    let mut vs = v.chunks_exact_mut(BLOCK);
    let mut at = base;
    for ((g, u), v) in gs.by_ref().zip(us.by_ref()).zip(vs.by_ref()) {
        let mut vals = [0f32; BLOCK];
        for (((s, u), v), &g) in vals.iter_mut().zip(u.iter_mut()).zip(v.iter_mut()).zip(g) {
            *u = m * *u + g;
            *v += *u;
            *s = *v;
        }
        sink.block(at, &vals);
        at += BLOCK;
    }
    let (g, u, v) = (gs.remainder(), us.into_remainder(), vs.into_remainder());
    for ((u, v), &g) in u.iter_mut().zip(v.iter_mut()).zip(g) {
        *u = m * *u + g;
        *v += *u;
    }
    sink.tail(at, v);
}

/// The first index of `x` holding NaN or ±inf, if any (parallel, read-only).
pub(crate) fn first_nonfinite(x: &[f32]) -> Option<usize> {
    fn in_task(x: &[f32], base: usize) -> Option<usize> {
        let mut blocks = x.chunks_exact(BLOCK);
        let mut at = base;
        for blk in blocks.by_ref() {
            // A max over the block vectorises; the exact position is found only on a hit.
            let worst = blk.iter().fold(0i32, |m, &v| m.max(key(v)));
            if worst >= NONFINITE_KEY {
                return blk
                    .iter()
                    .position(|&v| key(v) >= NONFINITE_KEY)
                    .map(|j| at + j);
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

/// Keys of a strided sample of about `s` values produced by `sweep` (not updating it): blocks
/// of 16 consecutive entries, one per stride, at an offset drawn from `seed`.
pub(crate) fn sample_keys(sweep: &Sweep<'_>, s: usize, seed: u64) -> Vec<i32> {
    let n = sweep.len();
    let blocks = s.div_ceil(BLOCK).clamp(1, (n / BLOCK).max(1));
    let stride = n / blocks;
    let span = BLOCK.min(stride);
    let offset = (mix64(seed) % (stride - span + 1) as u64) as usize;
    let block_keys = |b: usize| {
        let start = b * stride + offset;
        (start..start + span).map(|i| key(sweep.peek(i)))
    };
    if blocks < 1024 {
        return (0..blocks).flat_map(block_keys).collect();
    }
    (0..blocks)
        .into_par_iter()
        .flat_map_iter(block_keys)
        .collect()
}
