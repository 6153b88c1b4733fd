//! Multi-head scaled dot-product attention from a packed `[B, T, 3, H, D]` projection.
//!
//! Each (batch, head) pair is an independent task on rayon's threads: `S = Q Kᵀ · scale`
//! (GEMM reading Q and K in place through strides — no head split copies), a row softmax with
//! the causal mask applied in the same pass, then `O = P V`. The probabilities `P` are kept
//! for backward: `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(P ∘ dP)) · scale`,
//! `dQ = dS K`, `dK = dSᵀ Q`. With a causal mask every product skips the blocks above the
//! diagonal that are all zero.

use rayon::prelude::*;

use crate::linalg::fastmath::{dot_lanes, exp_nonpositive, max_lanes, sum_lanes};
use crate::linalg::gemm::{matmul, Strided};
use crate::linalg::simd::vectorized;

/// Shape of an attention call: batch, sequence length, heads, head dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Why an attention call was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttentionError {
    #[error("{what}: expected {expected} elements for shape {shape:?}, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
        shape: AttentionShape,
    },
}

impl AttentionShape {
    fn qkv_len(&self) -> usize {
        self.batch * self.seq * 3 * self.heads * self.head_dim
    }
    fn out_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }
    fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }
    /// Row stride of Q, K and V inside the packed projection.
    fn row_stride(&self) -> usize {
        3 * self.heads * self.head_dim
    }
    /// Offset of Q (`which` = 0), K (1) or V (2) of pair `(b, h)` in the packed projection.
    fn offset(&self, pair: usize, which: usize) -> usize {
        let (b, h) = (pair / self.heads, pair % self.heads);
        b * self.seq * self.row_stride() + which * self.heads * self.head_dim + h * self.head_dim
    }
    fn check(&self, what: &'static str, expected: usize, got: usize) -> Result<(), AttentionError> {
        if expected == got {
            Ok(())
        } else {
            Err(AttentionError::Length {
                what,
                expected,
                got,
                shape: *self,
            })
        }
    }
}

/// Rows `[lo, hi)` of a strided matrix as its own operand.
fn rows<'a>(m: Strided<'a>, lo: usize) -> Strided<'a> {
    Strided {
        data: &m.data[lo * m.rs..],
        rs: m.rs,
        cs: m.cs,
    }
}

/// Row blocks used to skip the zero upper triangle of causal products.
const BLOCK: usize = 64;

/// `O = P V` (or any product whose left factor is causal-lower-triangular `[T, T]`): each row
/// block of P only multiplies the rows of the right factor up to its diagonal.
fn lower_times(
    t: usize,
    n: usize,
    causal: bool,
    dst: &mut [f32],
    p: Strided<'_>,
    right: Strided<'_>,
) {
    if !causal {
        matmul((t, n, t), dst, n, p, right, false);
        return;
    }
    for (blk, chunk) in dst.chunks_mut(BLOCK * n).enumerate() {
        let lo = blk * BLOCK;
        let m = chunk.len() / n;
        let k = (lo + m).min(t);
        matmul((m, n, k), chunk, n, rows(p, lo), right, false);
    }
}

/// Forward. `qkv` is `[B, T, 3, H, D]`; writes `out` `[B, H, T, D]` and `probs`
/// `[B, H, T, T]` (kept for backward).
pub fn attention_forward(
    qkv: &[f32],
    shape: AttentionShape,
    causal: bool,
    out: &mut [f32],
    probs: &mut [f32],
) -> Result<(), AttentionError> {
    shape.check("qkv", shape.qkv_len(), qkv.len())?;
    shape.check("out", shape.out_len(), out.len())?;
    shape.check("probs", shape.probs_len(), probs.len())?;
    let (t, d, rs) = (shape.seq, shape.head_dim, shape.row_stride());
    if t == 0 || d == 0 || shape.batch * shape.heads == 0 {
        return Ok(());
    }
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(t * d)
        .zip(probs.par_chunks_mut(t * t))
        .enumerate()
        .for_each(|(pair, (o, p))| {
            let q = Strided {
                data: &qkv[shape.offset(pair, 0)..],
                rs,
                cs: 1,
            };
            let k_t = Strided {
                data: &qkv[shape.offset(pair, 1)..],
                rs: 1,
                cs: rs,
            };
            let v = Strided {
                data: &qkv[shape.offset(pair, 2)..],
                rs,
                cs: 1,
            };
            // S = Q Kᵀ, by row blocks, only up to the diagonal when causal.
            for (blk, chunk) in p.chunks_mut(BLOCK * t).enumerate() {
                let lo = blk * BLOCK;
                let m = chunk.len() / t;
                let n = if causal { (lo + m).min(t) } else { t };
                matmul((m, n, d), chunk, t, rows(q, lo), k_t, false);
            }
            for (i, row) in p.chunks_mut(t).enumerate() {
                softmax_row(row, if causal { i + 1 } else { t }, scale);
            }
            lower_times(
                t,
                d,
                causal,
                o,
                Strided {
                    data: p,
                    rs: t,
                    cs: 1,
                },
                v,
            );
        });
    Ok(())
}

/// `row[..live] ← softmax(row[..live] · scale)`, `row[live..] ← 0`.
fn softmax_row(row: &mut [f32], live: usize, scale: f32) {
    let (head, tail) = row.split_at_mut(live);
    tail.fill(0.0);
    vectorized(|| {
        let max = max_lanes(head);
        for x in head.iter_mut() {
            *x = exp_nonpositive((*x - max) * scale);
        }
        let inv = 1.0 / sum_lanes(head);
        head.iter_mut().for_each(|x| *x *= inv);
    })
}

/// Backward. `probs` and `out` from the forward (`[B, H, T, T]`, `[B, H, T, D]`), `d_out`
/// `[B, H, T, D]`; writes `d_qkv` as `[B, H, 3, T, D]` (dQ, dK, dV of each pair together).
pub fn attention_backward(
    qkv: &[f32],
    probs: &[f32],
    d_out: &[f32],
    shape: AttentionShape,
    causal: bool,
    d_qkv: &mut [f32],
) -> Result<(), AttentionError> {
    shape.check("qkv", shape.qkv_len(), qkv.len())?;
    shape.check("probs", shape.probs_len(), probs.len())?;
    shape.check("d_out", shape.out_len(), d_out.len())?;
    shape.check("d_qkv", shape.qkv_len(), d_qkv.len())?;
    let (t, d, rs) = (shape.seq, shape.head_dim, shape.row_stride());
    if t == 0 || d == 0 || shape.batch * shape.heads == 0 {
        return Ok(());
    }
    let scale = 1.0 / (d as f32).sqrt();
    d_qkv.par_chunks_mut(3 * t * d).enumerate().for_each_init(
        || vec![0.0f32; t * t],
        |ds, (pair, grads)| {
            let p = &probs[pair * t * t..(pair + 1) * t * t];
            let d_o = Strided {
                data: &d_out[pair * t * d..],
                rs: d,
                cs: 1,
            };
            let q = Strided {
                data: &qkv[shape.offset(pair, 0)..],
                rs,
                cs: 1,
            };
            let k = Strided {
                data: &qkv[shape.offset(pair, 1)..],
                rs,
                cs: 1,
            };
            let v_t = Strided {
                data: &qkv[shape.offset(pair, 2)..],
                rs: 1,
                cs: rs,
            };
            let (dq, rest) = grads.split_at_mut(t * d);
            let (dk, dv) = rest.split_at_mut(t * d);
            // dV = Pᵀ dO: Pᵀ is upper triangular, so row block i of dV needs dO rows ≥ its start.
            let p_t = Strided {
                data: p,
                rs: 1,
                cs: t,
            };
            upper_times(t, d, causal, dv, p_t, d_o);
            // dP = dO Vᵀ, only up to the diagonal when causal.
            for (blk, chunk) in ds.chunks_mut(BLOCK * t).enumerate() {
                let lo = blk * BLOCK;
                let m = chunk.len() / t;
                let n = if causal { (lo + m).min(t) } else { t };
                matmul((m, n, d), chunk, t, rows(d_o, lo), v_t, false);
            }
            // dS = P ∘ (dP − rowsum(P ∘ dP)) · scale, in place.
            vectorized(|| {
                for (i, (ds_row, p_row)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                    let live = if causal { i + 1 } else { t };
                    let dot = dot_lanes(&ds_row[..live], &p_row[..live]);
                    for (x, &pv) in ds_row[..live].iter_mut().zip(&p_row[..live]) {
                        *x = pv * (*x - dot) * scale;
                    }
                    ds_row[live..].fill(0.0);
                }
            });
            let ds_view = Strided {
                data: ds,
                rs: t,
                cs: 1,
            };
            lower_times(t, d, causal, dq, ds_view, k);
            upper_times(
                t,
                d,
                causal,
                dk,
                Strided {
                    data: ds,
                    rs: 1,
                    cs: t,
                },
                q,
            );
        },
    );
    Ok(())
}

/// `dst = U · right` where `U` `[T, T]` is upper triangular when causal (a transposed
/// lower-triangular matrix): row block i only needs the right factor's rows from its start.
fn upper_times(
    t: usize,
    n: usize,
    causal: bool,
    dst: &mut [f32],
    u: Strided<'_>,
    right: Strided<'_>,
) {
    if !causal {
        matmul((t, n, t), dst, n, u, right, false);
        return;
    }
    for (blk, chunk) in dst.chunks_mut(BLOCK * n).enumerate() {
        let lo = blk * BLOCK;
        let m = chunk.len() / n;
        let left = Strided {
            data: &u.data[lo * u.rs + lo * u.cs..],
            rs: u.rs,
            cs: u.cs,
        };
        let r = rows(right, lo);
        matmul((m, n, t - lo), chunk, n, left, r, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward f64 reference: returns (out [B,H,T,D], probs).
    fn reference(qkv: &[f32], s: AttentionShape, causal: bool) -> (Vec<f64>, Vec<f64>) {
        let (t, d) = (s.seq, s.head_dim);
        let at = |pair: usize, which: usize, i: usize, j: usize| {
            qkv[s.offset(pair, which) + i * s.row_stride() + j] as f64
        };
        let mut out = vec![0.0; s.out_len()];
        let mut probs = vec![0.0; s.probs_len()];
        for pair in 0..s.batch * s.heads {
            for i in 0..t {
                let live = if causal { i + 1 } else { t };
                let scores: Vec<f64> = (0..live)
                    .map(|j| {
                        (0..d)
                            .map(|c| at(pair, 0, i, c) * at(pair, 1, j, c))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..live {
                    probs[pair * t * t + i * t + j] = e[j] / z;
                    for c in 0..d {
                        out[pair * t * d + i * d + c] += e[j] / z * at(pair, 2, j, c);
                    }
                }
            }
        }
        (out, probs)
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                    * 2.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn forward_matches_reference_causal_and_not() {
        for &(b, t, h, d) in &[(2, 70, 3, 8), (1, 1, 1, 4), (1, 130, 2, 16)] {
            let s = AttentionShape {
                batch: b,
                seq: t,
                heads: h,
                head_dim: d,
            };
            let qkv = data(s.qkv_len(), 7);
            for causal in [true, false] {
                let mut out = vec![0.0; s.out_len()];
                let mut probs = vec![0.0; s.probs_len()];
                attention_forward(&qkv, s, causal, &mut out, &mut probs).unwrap();
                let (ro, rp) = reference(&qkv, s, causal);
                let worst_o = out
                    .iter()
                    .zip(&ro)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                let worst_p = probs
                    .iter()
                    .zip(&rp)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst_o < 1e-5 && worst_p < 1e-5,
                    "{s:?} causal={causal}: {worst_o} {worst_p}"
                );
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences_of_a_projection() {
        let s = AttentionShape {
            batch: 1,
            seq: 67,
            heads: 2,
            head_dim: 4,
        };
        let qkv = data(s.qkv_len(), 3);
        let proj = data(s.out_len(), 11); // L = <out, proj>
        for causal in [true, false] {
            let mut out = vec![0.0; s.out_len()];
            let mut probs = vec![0.0; s.probs_len()];
            attention_forward(&qkv, s, causal, &mut out, &mut probs).unwrap();
            let mut d_qkv = vec![0.0; s.qkv_len()];
            attention_backward(&qkv, &probs, &proj, s, causal, &mut d_qkv).unwrap();
            let loss = |x: &[f32]| -> f64 {
                let (o, _) = reference(x, s, causal);
                o.iter().zip(&proj).map(|(a, b)| a * *b as f64).sum()
            };
            // d_qkv is [B, H, 3, T, D]; compare a spread of entries.
            for probe in (0..s.qkv_len()).step_by(97) {
                let (b_t, rest) = (probe / s.row_stride(), probe % s.row_stride());
                let (which, hd) = (rest / (s.heads * s.head_dim), rest % (s.heads * s.head_dim));
                let (h, c) = (hd / s.head_dim, hd % s.head_dim);
                let (b, ti) = (b_t / s.seq, b_t % s.seq);
                let pair = b * s.heads + h;
                let analytic = d_qkv[pair * 3 * s.seq * s.head_dim
                    + which * s.seq * s.head_dim
                    + ti * s.head_dim
                    + c] as f64;
                let eps = 1e-2f32;
                let mut plus = qkv.clone();
                plus[probe] += eps;
                let mut minus = qkv.clone();
                minus[probe] -= eps;
                let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
                assert!(
                    (analytic - numeric).abs() < 2e-3 * (1.0 + numeric.abs()),
                    "causal={causal} probe {probe}: {analytic} vs {numeric}"
                );
            }
        }
    }

    #[test]
    fn refuses_wrong_lengths() {
        let s = AttentionShape {
            batch: 1,
            seq: 4,
            heads: 1,
            head_dim: 2,
        };
        let err = attention_forward(&[0.0; 3], s, true, &mut [0.0; 8], &mut [0.0; 16]).unwrap_err();
        assert!(matches!(
            err,
            AttentionError::Length {
                what: "qkv",
                expected: 24,
                got: 3,
                ..
            }
        ));
    }
}
