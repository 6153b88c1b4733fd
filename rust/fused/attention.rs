//! Multi-head scaled dot-product attention from a packed `[B, T, 3, H, D]` projection.
//!
//! Each (batch, head) pair is an independent task on rayon's threads: `S = Q Kᵀ · scale`
//! (GEMM reading Q and K in place through strides — no head split copies), a row softmax with
//! the causal mask applied in the same pass, then `O = P V`. The probabilities `P` are kept
//! for backward: `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(P ∘ dP)) · scale`,
//! `dQ = dS K`, `dK = dSᵀ Q`. With a causal mask every product skips the blocks above the
//! diagonal that are all zero.
//!
//! Inputs and outputs stay in the layouts the projections around attention use: `out` and
//! `d_out` are `[B, T, H, D]` and `d_qkv` is `[B, T, 3, H, D]`, written by each pair into its
//! own column band ([`tiles`]), so no head split or merge is ever copied.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use half::bf16;

use crate::linalg::bf16::Elem;
use crate::linalg::buffers::{
    as_uninit, assume_init, filled, filled_pair, write_zeros, zeroed, OutOfMemory,
};
use crate::linalg::fastmath::{dot_lanes, exp_nonpositive, max_lanes, sum_lanes};
use crate::linalg::gemm::{matmul, matmul_tile, matmul_uninit, Strided};
use crate::linalg::simd::vectorized;
use crate::linalg::tiles::{tiles, Tile};

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
    #[error("heads and head_dim must be at least 1, got {0:?}")]
    Empty(AttentionShape),
    #[error("{what}: cannot allocate {bytes} bytes")]
    OutOfMemory { what: &'static str, bytes: usize },
}

impl From<OutOfMemory> for AttentionError {
    fn from(e: OutOfMemory) -> Self {
        AttentionError::OutOfMemory {
            what: e.what,
            bytes: e.bytes,
        }
    }
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
    /// Pair `(b, h)`'s `[T, D]` matrix inside a `[B, T, H, D]` array (`out`, `d_out`).
    fn merged<'a>(&self, data: &'a [f32], pair: usize) -> Strided<'a> {
        let (b, h) = (pair / self.heads, pair % self.heads);
        let rs = self.heads * self.head_dim;
        Strided {
            data: &data[b * self.seq * rs + h * self.head_dim..],
            rs,
            cs: 1,
        }
    }
    /// Q (`which` = 0), K (1) or V (2) of a pair, read in place (`transposed`: its `[D, T]`
    /// transpose).
    fn operand<'a>(
        &self,
        qkv: &'a [f32],
        pair: usize,
        which: usize,
        transposed: bool,
    ) -> Strided<'a> {
        let (rs, cs) = if transposed {
            (1, self.row_stride())
        } else {
            (self.row_stride(), 1)
        };
        Strided {
            data: &qkv[self.offset(pair, which)..],
            rs,
            cs,
        }
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
    fn check_nonempty(&self) -> Result<(), AttentionError> {
        if self.heads == 0 || self.head_dim == 0 {
            return Err(AttentionError::Empty(*self));
        }
        Ok(())
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

/// `dst = M · right` for `M` `[T, T]`, which is lower triangular when causal (P, dS) or upper
/// triangular (their transposes): each row block of M multiplies only the rows of the right
/// factor that its non-zero columns meet — up to its diagonal, or from it.
fn triangular_times(
    (t, n): (usize, usize),
    causal: bool,
    upper: bool,
    dst: &mut Tile<'_>,
    m: Strided<'_>,
    right: Strided<'_>,
) {
    if !causal {
        matmul_tile((t, n, t), dst, 0, m, right, false);
        return;
    }
    for lo in (0..t).step_by(BLOCK) {
        let height = BLOCK.min(t - lo);
        let (k0, k1) = if upper { (lo, t) } else { (0, lo + height) };
        let left = Strided {
            data: &m.data[lo * m.rs + k0 * m.cs..],
            ..m
        };
        matmul_tile((height, n, k1 - k0), dst, lo, left, rows(right, k0), false);
    }
}

/// Forward. `qkv` is `[B, T, 3, H, D]`; returns `out` `[B, T, H, D]` (heads merged, as the
/// output projection reads it) and `probs` `[B, H, T, T]` (kept for backward).
pub fn attention_forward(
    qkv: &[f32],
    shape: AttentionShape,
    causal: bool,
) -> Result<(Vec<f32>, Vec<f32>), AttentionError> {
    shape.check_nonempty()?;
    shape.check("qkv", shape.qkv_len(), qkv.len())?;
    let fill = |out: &mut [MaybeUninit<f32>], probs: &mut [MaybeUninit<f32>]| {
        forward_into(qkv, shape, causal, out, probs)
    };
    // SAFETY: `forward_into` writes every element of both buffers (see there).
    let (out, probs) =
        unsafe { filled_pair(("out", "probs"), (shape.out_len(), shape.probs_len()), fill) }?;
    Ok((out, probs))
}

/// Writes every element of `out` (the pairs' tiles cover it) and of `probs` (each row's
/// product part, then its zero tail, then the softmax in place).
fn forward_into(
    qkv: &[f32],
    shape: AttentionShape,
    causal: bool,
    out: &mut [MaybeUninit<f32>],
    probs: &mut [MaybeUninit<f32>],
) {
    let (t, d) = (shape.seq, shape.head_dim);
    if out.is_empty() {
        return; // no rows (T or B is 0), so `probs` is empty too
    }
    let scale = 1.0 / (d as f32).sqrt();
    let pairs = tiles(out, shape.heads * d, t, d);
    pairs
        .into_par_iter()
        .zip(probs.par_chunks_mut(t * t))
        .enumerate()
        .for_each(|(pair, (mut o, p))| {
            let q = shape.operand(qkv, pair, 0, false);
            let k_t = shape.operand(qkv, pair, 1, true);
            let v = shape.operand(qkv, pair, 2, false);
            // S = Q Kᵀ, by row blocks, only up to the diagonal when causal; zeros beyond.
            for (blk, chunk) in p.chunks_mut(BLOCK * t).enumerate() {
                let lo = blk * BLOCK;
                let m = chunk.len() / t;
                let n = if causal { (lo + m).min(t) } else { t };
                matmul_uninit((m, n, d), chunk, t, rows(q, lo), k_t, false);
                chunk
                    .chunks_mut(t)
                    .for_each(|row| write_zeros(&mut row[n..]));
            }
            // SAFETY: the loop above wrote columns < n of every row by the product, the rest
            // with zeros.
            let p = unsafe { assume_init(p) };
            for (i, row) in p.chunks_mut(t).enumerate() {
                softmax_row(row, if causal { i + 1 } else { t }, scale);
            }
            let p = Strided {
                data: p,
                rs: t,
                cs: 1,
            };
            triangular_times((t, d), causal, false, &mut o, p, v);
        });
}

/// `row[..live] ← softmax(row[..live] · scale)`, `row[live..] ← 0`.
fn softmax_row(row: &mut [f32], live: usize, scale: f32) {
    let (head, tail) = row.split_at_mut(live);
    tail.fill(0.0);
    vectorized(
        #[inline(always)]
        || {
            let max = max_lanes(head);
            for x in head.iter_mut() {
                *x = exp_nonpositive((*x - max) * scale);
            }
            let inv = 1.0 / sum_lanes(head);
            head.iter_mut().for_each(|x| *x *= inv);
        },
    )
}

/// Backward. `probs` from the forward (`[B, H, T, T]`) and `d_out` `[B, T, H, D]`; returns
/// `d_qkv` `[B, T, 3, H, D]`, the layout of `qkv`.
pub fn attention_backward(
    qkv: &[f32],
    probs: &[f32],
    d_out: &[f32],
    shape: AttentionShape,
    causal: bool,
) -> Result<Vec<f32>, AttentionError> {
    shape.check_nonempty()?;
    shape.check("qkv", shape.qkv_len(), qkv.len())?;
    shape.check("probs", shape.probs_len(), probs.len())?;
    shape.check("d_out", shape.out_len(), d_out.len())?;
    let fill =
        |d_qkv: &mut [MaybeUninit<f32>]| backward_into(qkv, probs, d_out, shape, causal, d_qkv);
    // SAFETY: `backward_into` writes every element (see there).
    Ok(unsafe { filled("d_qkv", shape.qkv_len(), fill) }?)
}

/// [`attention_forward`] for a bf16 `qkv`: one batch row at a time, its `[T, 3·H·D]` slice
/// is widened to f32 (exact), the f32 kernel runs on it (its heads side by side), and its
/// output is rounded once into the bf16 `out`; `probs` stay f32 (softmax in f32).
pub fn attention_forward_bf16(
    qkv: &[bf16],
    shape: AttentionShape,
    causal: bool,
) -> Result<(Vec<bf16>, Vec<f32>), AttentionError> {
    shape.check_nonempty()?;
    shape.check("qkv", shape.qkv_len(), qkv.len())?;
    let mut out: Vec<bf16> = zeroed("out", shape.out_len())?;
    let mut probs: Vec<f32> = zeroed("probs", shape.probs_len())?;
    let one = AttentionShape { batch: 1, ..shape };
    if one.out_len() == 0 {
        return Ok((out, probs));
    }
    let (mut wide, mut acc) = (Vec::new(), Vec::new());
    let rows = qkv
        .chunks(one.qkv_len())
        .zip(out.chunks_mut(one.out_len()))
        .zip(probs.chunks_mut(one.probs_len()));
    for ((q, o), p) in rows {
        let q = bf16::widen(q, &mut wide);
        bf16::through_f32(o, &mut acc, |o| {
            forward_into(q, one, causal, as_uninit(o), as_uninit(p))
        });
    }
    Ok((out, probs))
}

/// [`attention_backward`] for a bf16 `qkv` and `d_out` (f32 `probs`): batch row by batch row
/// as [`attention_forward_bf16`], `d_qkv` rounded once into bf16.
pub fn attention_backward_bf16(
    qkv: &[bf16],
    probs: &[f32],
    d_out: &[bf16],
    shape: AttentionShape,
    causal: bool,
) -> Result<Vec<bf16>, AttentionError> {
    shape.check_nonempty()?;
    shape.check("qkv", shape.qkv_len(), qkv.len())?;
    shape.check("probs", shape.probs_len(), probs.len())?;
    shape.check("d_out", shape.out_len(), d_out.len())?;
    let mut d_qkv: Vec<bf16> = zeroed("d_qkv", shape.qkv_len())?;
    let one = AttentionShape { batch: 1, ..shape };
    if one.out_len() == 0 {
        return Ok(d_qkv);
    }
    let (mut wide_q, mut wide_d, mut acc) = (Vec::new(), Vec::new(), Vec::new());
    let rows = qkv
        .chunks(one.qkv_len())
        .zip(probs.chunks(one.probs_len()))
        .zip(d_out.chunks(one.out_len()))
        .zip(d_qkv.chunks_mut(one.qkv_len()));
    for (((q, p), g), dq) in rows {
        let (q, g) = (bf16::widen(q, &mut wide_q), bf16::widen(g, &mut wide_d));
        bf16::through_f32(dq, &mut acc, |dq| {
            backward_into(q, p, g, one, causal, as_uninit(dq))
        });
    }
    Ok(d_qkv)
}

/// The `[T, D]` tiles of dQ, dK and dV of each pair, in pair order, from the tiles of a
/// `[B, T, 3, H, D]` buffer (per batch row: the H tiles of dQ, then of dK, then of dV).
fn pair_tiles(grid: Vec<Tile<'_>>, heads: usize) -> Vec<[Tile<'_>; 3]> {
    let mut out = Vec::with_capacity(grid.len() / 3);
    let mut it = grid.into_iter();
    loop {
        let dq: Vec<Tile<'_>> = it.by_ref().take(heads).collect();
        if dq.is_empty() {
            return out;
        }
        let dk: Vec<Tile<'_>> = it.by_ref().take(heads).collect();
        let dv: Vec<Tile<'_>> = it.by_ref().take(heads).collect();
        out.extend(dq.into_iter().zip(dk).zip(dv).map(|((q, k), v)| [q, k, v]));
    }
}

/// Writes every element of `d_qkv`: each pair's dQ, dK and dV tiles cover it, and each tile
/// is written whole by its product.
fn backward_into(
    qkv: &[f32],
    probs: &[f32],
    d_out: &[f32],
    shape: AttentionShape,
    causal: bool,
    d_qkv: &mut [MaybeUninit<f32>],
) {
    let (t, d) = (shape.seq, shape.head_dim);
    if d_qkv.is_empty() {
        return;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let pairs = pair_tiles(tiles(d_qkv, shape.row_stride(), t, d), shape.heads);
    pairs.into_par_iter().enumerate().for_each_init(
        || vec![0.0f32; t * t],
        |ds, (pair, [mut dq, mut dk, mut dv])| {
            let p = &probs[pair * t * t..(pair + 1) * t * t];
            let d_o = shape.merged(d_out, pair);
            let q = shape.operand(qkv, pair, 0, false);
            let k = shape.operand(qkv, pair, 1, false);
            let v_t = shape.operand(qkv, pair, 2, true);
            // dV = Pᵀ dO: Pᵀ is upper triangular, so row block i of dV needs dO rows ≥ its start.
            let p_t = Strided {
                data: p,
                rs: 1,
                cs: t,
            };
            triangular_times((t, d), causal, true, &mut dv, p_t, d_o);
            // dP = dO Vᵀ, only up to the diagonal when causal.
            for (blk, chunk) in ds.chunks_mut(BLOCK * t).enumerate() {
                let lo = blk * BLOCK;
                let m = chunk.len() / t;
                let n = if causal { (lo + m).min(t) } else { t };
                matmul((m, n, d), chunk, t, rows(d_o, lo), v_t, false);
            }
            // dS = P ∘ (dP − rowsum(P ∘ dP)) · scale, in place.
            vectorized(
                #[inline(always)]
                || {
                    for (i, (ds_row, p_row)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                        let live = if causal { i + 1 } else { t };
                        let dot = dot_lanes(&ds_row[..live], &p_row[..live]);
                        for (x, &pv) in ds_row[..live].iter_mut().zip(&p_row[..live]) {
                            *x = pv * (*x - dot) * scale;
                        }
                        ds_row[live..].fill(0.0);
                    }
                },
            );
            let ds_rows = Strided {
                data: ds,
                rs: t,
                cs: 1,
            };
            triangular_times((t, d), causal, false, &mut dq, ds_rows, k);
            let ds_t = Strided {
                data: ds,
                rs: 1,
                cs: t,
            };
            triangular_times((t, d), causal, true, &mut dk, ds_t, q);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward f64 reference: returns (out [B,T,H,D], probs [B,H,T,T]).
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
                    let (b, h) = (pair / s.heads, pair % s.heads);
                    for c in 0..d {
                        out[((b * t + i) * s.heads + h) * d + c] += e[j] / z * at(pair, 2, j, c);
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
                let (out, probs) = attention_forward(&qkv, s, causal).unwrap();
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
            let (_, probs) = attention_forward(&qkv, s, causal).unwrap();
            let d_qkv = attention_backward(&qkv, &probs, &proj, s, causal).unwrap();
            let loss = |x: &[f32]| -> f64 {
                let (o, _) = reference(x, s, causal);
                o.iter().zip(&proj).map(|(a, b)| a * *b as f64).sum()
            };
            // d_qkv has the layout of qkv; compare a spread of entries.
            for probe in (0..s.qkv_len()).step_by(97) {
                let analytic = d_qkv[probe] as f64;
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
    fn refuses_wrong_lengths_and_empty_heads() {
        let s = AttentionShape {
            batch: 1,
            seq: 4,
            heads: 1,
            head_dim: 2,
        };
        let err = attention_forward(&[0.0; 3], s, true).unwrap_err();
        assert!(matches!(
            err,
            AttentionError::Length {
                what: "qkv",
                expected: 24,
                got: 3,
                ..
            }
        ));
        let err = attention_backward(&[0.0; 24], &[0.0; 16], &[0.0; 7], s, true).unwrap_err();
        assert!(matches!(
            err,
            AttentionError::Length {
                what: "d_out",
                expected: 8,
                got: 7,
                ..
            }
        ));
        let flat = AttentionShape { head_dim: 0, ..s };
        assert_eq!(
            attention_forward(&[], flat, true),
            Err(AttentionError::Empty(flat))
        );
    }

    #[test]
    fn empty_batch_or_sequence_gives_empty_outputs() {
        for (batch, seq) in [(0, 5), (3, 0)] {
            let s = AttentionShape {
                batch,
                seq,
                heads: 2,
                head_dim: 4,
            };
            let (out, probs) = attention_forward(&[], s, true).unwrap();
            assert!(out.is_empty() && probs.is_empty());
            assert!(attention_backward(&[], &[], &[], s, false)
                .unwrap()
                .is_empty());
        }
    }
}
