//! The compute order of each schedule on one rank: (pass, micro-batch, local chunk).
//! [`super::build`] adds the messages.

use super::{Kind, Pass};

/// The order in which rank `rank` of `p` runs its forwards and backwards in one step.
pub fn compute_order(
    kind: Kind,
    p: usize,
    rank: usize,
    m: usize,
    chunks: usize,
) -> Vec<(Pass, usize, usize)> {
    match kind {
        Kind::Gpipe => gpipe(m),
        Kind::OneFOneB => one_f_one_b(p, rank, m),
        Kind::Interleaved => interleaved(p, rank, m, chunks),
        Kind::DualPipe => dualpipe(p, rank, m),
    }
}

/// GPipe: every forward, then every backward.
fn gpipe(m: usize) -> Vec<(Pass, usize, usize)> {
    let forwards = (0..m).map(|i| (Pass::Forward, i, 0));
    forwards
        .chain((0..m).map(|i| (Pass::Backward, i, 0)))
        .collect()
}

/// 1F1B (PipeDream-Flush, Megatron-LM §2.2): `p − rank − 1` warm-up forwards, then
/// alternately one forward and one backward, then the remaining backwards. At most
/// `p − rank` micro-batches are between their forward and their backward on this rank.
fn one_f_one_b(p: usize, rank: usize, m: usize) -> Vec<(Pass, usize, usize)> {
    let warmup = (p - rank - 1).min(m);
    let mut out = Vec::with_capacity(2 * m);
    out.extend((0..warmup).map(|i| (Pass::Forward, i, 0)));
    for i in 0..m - warmup {
        out.push((Pass::Forward, i + warmup, 0));
        out.push((Pass::Backward, i, 0));
    }
    out.extend((m - warmup..m).map(|i| (Pass::Backward, i, 0)));
    out
}

/// Interleaved 1F1B (Megatron-LM, `schedules.py`): the rank holds `v` chunks (stage
/// `c·p + rank` in chunk `c`); forwards go in groups of `p` micro-batches per chunk, chunk 0
/// to `v − 1`, backwards the same with chunks in reverse. Warm-up: `2·(p − rank − 1) +
/// (v − 1)·p` forwards (all of them when `m = p`), then one forward one backward.
fn interleaved(p: usize, rank: usize, m: usize, v: usize) -> Vec<(Pass, usize, usize)> {
    let total = m * v;
    let unit = |k: usize, pass: Pass| {
        let group = k / (p * v);
        let in_group = k % (p * v);
        let chunk = in_group / p;
        let chunk = if pass == Pass::Forward {
            chunk
        } else {
            v - 1 - chunk
        };
        (pass, group * p + in_group % p, chunk)
    };
    let warmup = if m == p {
        total
    } else {
        (2 * (p - rank - 1) + (v - 1) * p).min(total)
    };
    let mut out = Vec::with_capacity(2 * total);
    out.extend((0..warmup).map(|k| unit(k, Pass::Forward)));
    for k in 0..total - warmup {
        out.push(unit(k + warmup, Pass::Forward));
        out.push(unit(k, Pass::Backward));
    }
    out.extend((total - warmup..total).map(|k| unit(k, Pass::Backward)));
    out
}

/// The next forward and backward micro-batch of one DualPipe phase.
struct Phase {
    chunk: usize,
    first_mb: usize,
    next_forward: usize,
    next_backward: usize,
}

impl Phase {
    /// The phase's next forward or backward.
    fn next(&mut self, pass: Pass) -> (Pass, usize, usize) {
        let count = match pass {
            Pass::Forward => &mut self.next_forward,
            Pass::Backward => &mut self.next_backward,
        };
        *count += 1;
        (pass, self.first_mb + *count - 1, self.chunk)
    }

    fn forward(&mut self) -> (Pass, usize, usize) {
        self.next(Pass::Forward)
    }

    fn backward(&mut self) -> (Pass, usize, usize) {
        self.next(Pass::Backward)
    }
}

/// DualPipe (DeepSeek-V3 §3.2.1; the loop structure of `deepseek-ai/DualPipe`
/// `dualpipe.py::step`). Micro-batches `0..m/2` enter at rank 0, `m/2..m` at rank `p − 1`.
/// On each rank, phase 0 is the direction in which the rank sits in the first half of the
/// pipeline and phase 1 the other; with `h = p/2`, `hr = min(rank, p − 1 − rank)` and
/// `H = m/2`, the eight loops are: `2(h−hr−1)` F0; `hr+1` × (F0 F1); `h−hr−1` × (B1 F1);
/// `H−p+hr+1` × (F0 B1 F1 B0) — the main loop, where DualPipe overlaps each forward with
/// the backward beside it; `h−hr−1` × (B1 F1 B0); `hr+1` × (B1 B0); `h−hr−1` × B0. The
/// reference defers part of each backward (the weight gradients, "W") to fill bubbles; this
/// engine's backward computes input and weight gradients together, so the W passes are
/// part of each B here.
fn dualpipe(p: usize, rank: usize, m: usize) -> Vec<(Pass, usize, usize)> {
    let (h, half_m) = (p / 2, m / 2);
    let hr = rank.min(p - 1 - rank);
    let first_half = rank < h;
    // Direction 0 (micro-batches 0..H) runs in chunk 0, direction 1 (H..m) in chunk 1.
    let phase = |dir: usize| Phase {
        chunk: dir,
        first_mb: dir * half_m,
        next_forward: 0,
        next_backward: 0,
    };
    let (mut p0, mut p1) = if first_half {
        (phase(0), phase(1))
    } else {
        (phase(1), phase(0))
    };
    let mut out = Vec::with_capacity(2 * m);
    for _ in 0..2 * (h - hr - 1) {
        out.push(p0.forward());
    }
    for _ in 0..hr + 1 {
        out.push(p0.forward());
        out.push(p1.forward());
    }
    for _ in 0..h - hr - 1 {
        out.push(p1.backward());
        out.push(p1.forward());
    }
    for _ in 0..half_m + hr + 1 - p {
        out.push(p0.forward());
        out.push(p1.backward());
        out.push(p1.forward());
        out.push(p0.backward());
    }
    for _ in 0..h - hr - 1 {
        out.push(p1.backward());
        out.push(p1.forward());
        out.push(p0.backward());
    }
    for _ in 0..hr + 1 {
        out.push(p1.backward());
        out.push(p0.backward());
    }
    for _ in 0..h - hr - 1 {
        out.push(p0.backward());
    }
    out
}
