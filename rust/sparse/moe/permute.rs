//! Permute: the `T·k` (token, slot) assignments grouped by expert, with capacity dropping
//! and zero-row padding, and the rows of `x` gathered into that order.

use std::mem::MaybeUninit;

use super::error::MoeError;
use super::matrix::Matrix;
use super::par::{rows_per_block, run, MEMORY_BOUND};
use super::route::check_expert_idx;
use crate::linalg::buffers::{filled, write_copy, write_scaled, write_zeros, zeroed};

/// The knobs of [`permute`].
#[derive(Debug, Clone, Copy)]
pub struct PermuteOptions<'a> {
    /// E, the number of experts (`expert_idx` entries are in `[0, E)`).
    pub n_experts: usize,
    /// At most this many rows per expert (before padding); needs `weights`.
    pub capacity: Option<usize>,
    /// `[T, k]` routing weights: over capacity, the lowest-weight assignments are dropped.
    pub weights: Option<Matrix<'a, f32>>,
    /// Each expert's rows are padded with zero rows to a multiple of this (>= 1).
    pub pad_to: usize,
}

/// What [`permute`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Permuted {
    /// `[R, d]`: the gathered rows, expert 0's first; padding rows are zeros.
    pub x_sorted: Vec<f32>,
    /// `[R]`: the flat assignment index `t·k + j` each row came from, `-1` for padding.
    pub order: Vec<i32>,
    /// `[E]`: rows of each expert in `x_sorted`, padding included (they sum to R).
    pub counts: Vec<i32>,
}

impl Permuted {
    /// R, the number of rows of `x_sorted`.
    pub fn rows(&self) -> usize {
        self.order.len()
    }
}

/// Groups the rows of `x` (`[T, d]`) by the experts of `expert_idx` (`[T, k]`).
///
/// Rows of one expert keep the order of their flat assignment index `t·k + j` (stable).
/// With `capacity`, an expert keeping more than `capacity` assignments drops the ones with
/// the lowest weight (ties: the later assignment goes first); dropped assignments appear
/// nowhere. With `pad_to`, each expert's rows are followed by zero rows up to a multiple of
/// `pad_to`, marked `-1` in `order` and counted in `counts`.
pub fn permute(
    x: Matrix<'_, f32>,
    expert_idx: Matrix<'_, i32>,
    opts: &PermuteOptions<'_>,
) -> Result<Permuted, MoeError> {
    let (order, counts) = permute_order(expert_idx, x.rows(), opts)?;
    let x_sorted = gather_rows("x_sorted", x, &order, expert_idx.cols(), None)?;
    Ok(Permuted {
        x_sorted,
        order,
        counts,
    })
}

/// The `order` and `counts` of [`permute`] without moving any row (`n_tokens` = T).
pub fn permute_order(
    expert_idx: Matrix<'_, i32>,
    n_tokens: usize,
    opts: &PermuteOptions<'_>,
) -> Result<(Vec<i32>, Vec<i32>), MoeError> {
    let e = opts.n_experts;
    let (t, k) = (expert_idx.rows(), expert_idx.cols());
    if e == 0 || i32::try_from(e).is_err() {
        return Err(MoeError::value("n_experts", "an integer in [1, 2^31)", e));
    }
    if t != n_tokens {
        return Err(MoeError::shape(
            "expert_idx",
            format!("[T, k] with T = {n_tokens} (rows of x)"),
            expert_idx.shape(),
        ));
    }
    if k == 0 || k > e {
        return Err(MoeError::shape(
            "expert_idx",
            format!("[T, k] with 1 <= k <= n_experts = {e}"),
            expert_idx.shape(),
        ));
    }
    let tk = t * k;
    if i32::try_from(tk).is_err() {
        return Err(MoeError::shape(
            "expert_idx",
            "at most 2^31 - 1 assignments (order is int32)",
            expert_idx.shape(),
        ));
    }
    if opts.pad_to == 0 {
        return Err(MoeError::value("pad_to", "an integer >= 1", 0));
    }
    if let Some(w) = opts.weights {
        w.expect_shape("weights", t, k)?;
    }
    let weights = match (opts.capacity, opts.weights) {
        (Some(_), None) => {
            return Err(MoeError::value(
                "weights",
                "an array of shape [T, k] when capacity is given",
                "None",
            ))
        }
        (Some(_), Some(w)) => {
            if let Some(i) = w.data().iter().position(|v| !v.is_finite()) {
                return Err(MoeError::entry(
                    "weights",
                    &[i / k, i % k],
                    "a finite value",
                    w.data()[i],
                ));
            }
            Some(w.data())
        }
        (None, _) => None,
    };
    check_expert_idx(expert_idx, e)?;

    // Counting sort of the flat assignment indices by expert: stable by construction.
    let mut starts = vec![0usize; e + 1];
    for &i in expert_idx.data() {
        starts[i as usize + 1] += 1;
    }
    for i in 0..e {
        starts[i + 1] += starts[i];
    }
    let mut by_expert = vec![0i32; tk];
    let mut next = starts.clone();
    for (flat, &i) in expert_idx.data().iter().enumerate() {
        // flat < T·k <= i32::MAX, checked above.
        by_expert[next[i as usize]] = flat as i32;
        next[i as usize] += 1;
    }

    // Keep, per expert, what fits its capacity (lowest weight dropped, later first on ties).
    let rows_of = |ex: usize| &by_expert[starts[ex]..starts[ex + 1]];
    let trimmed: Vec<Option<Vec<i32>>> = (0..e)
        .map(|ex| match (opts.capacity, weights) {
            (Some(cap), Some(w)) if rows_of(ex).len() > cap => {
                let mut keep = rows_of(ex).to_vec();
                keep.sort_by(|&a, &b| w[b as usize].total_cmp(&w[a as usize]).then(a.cmp(&b)));
                keep.truncate(cap);
                keep.sort_unstable();
                Some(keep)
            }
            _ => None,
        })
        .collect();
    let kept: Vec<&[i32]> = (0..e)
        .map(|ex| trimmed[ex].as_deref().unwrap_or(rows_of(ex)))
        .collect();

    let mut counts = Vec::with_capacity(e);
    let mut total = 0usize;
    for rows in &kept {
        let padded = rows.len().div_ceil(opts.pad_to).saturating_mul(opts.pad_to);
        total = total.saturating_add(padded);
        counts.push(padded);
    }
    if i32::try_from(total).is_err() {
        return Err(MoeError::value(
            "pad_to",
            "a value keeping the padded rows below 2^31 (order is int32)",
            opts.pad_to,
        ));
    }
    let mut order: Vec<i32> = zeroed("order", total)?;
    let mut at = 0;
    for (rows, &padded) in kept.iter().zip(&counts) {
        order[at..at + rows.len()].copy_from_slice(rows);
        order[at + rows.len()..at + padded].fill(-1);
        at += padded;
    }
    // Every padded count is <= total < 2^31.
    let counts = counts.into_iter().map(|c| c as i32).collect();
    Ok((order, counts))
}

/// A new `[order.len(), d]` matrix whose row `r` is `scale[order[r]] · x[order[r] / k]`
/// (scale 1 when `None`), or zeros where `order[r] < 0`. `what` names it if it cannot be
/// allocated.
///
/// `order` must hold values in `[-1, x.rows() · k)` (validated by the callers; a violation
/// panics on a bounds check, it cannot read out of bounds).
pub(crate) fn gather_rows(
    what: &'static str,
    x: Matrix<'_, f32>,
    order: &[i32],
    k: usize,
    scale: Option<&[f32]>,
) -> Result<Vec<f32>, MoeError> {
    let d = x.cols();
    let fill = |out: &mut [MaybeUninit<f32>]| {
        if d == 0 {
            return;
        }
        let rows = rows_per_block(order.len(), d * 4 * 2, MEMORY_BOUND);
        let blocks: Vec<_> = out.chunks_mut(rows * d).zip(order.chunks(rows)).collect();
        run(blocks, |_, (dst, ord)| {
            for (row, &o) in dst.chunks_mut(d).zip(ord) {
                if o < 0 {
                    write_zeros(row);
                    continue;
                }
                let src = x.row(o as usize / k);
                match scale {
                    None => write_copy(row, src),
                    Some(s) => write_scaled(row, s[o as usize], src),
                }
            }
        });
    };
    // SAFETY: `out` has order.len() · d elements; its blocks of `rows · d` pair up with
    // `order`'s blocks of `rows` entries, and every d-wide row of every block is written
    // (copied, scaled or zeroed). With d == 0 there is nothing to write.
    Ok(unsafe { filled(what, order.len().saturating_mul(d), fill) }?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(e: usize) -> PermuteOptions<'static> {
        PermuteOptions {
            n_experts: e,
            capacity: None,
            weights: None,
            pad_to: 1,
        }
    }

    #[test]
    fn groups_by_expert_stably() {
        // T = 3, k = 2: assignments (flat) 0:e1 1:e0 2:e1 3:e2 4:e0 5:e1
        let idx = [1, 0, 1, 2, 0, 1];
        let x = [10.0f32, 11.0, 12.0];
        let p = permute(
            Matrix::new("x", &x, 3, 1).unwrap(),
            Matrix::new("expert_idx", &idx, 3, 2).unwrap(),
            &opts(4),
        )
        .unwrap();
        assert_eq!(p.order, vec![1, 4, 0, 2, 5, 3]);
        assert_eq!(p.counts, vec![2, 3, 1, 0]);
        assert_eq!(p.x_sorted, vec![10.0, 12.0, 10.0, 11.0, 12.0, 11.0]);
    }

    #[test]
    fn capacity_drops_lowest_weight_then_later_tokens() {
        // All four tokens pick expert 0 (k = 1); capacity 2.
        let idx = [0, 0, 0, 0];
        let w = [0.5f32, 0.9, 0.5, 0.5];
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let mut o = opts(2);
        o.capacity = Some(2);
        o.weights = Some(Matrix::new("weights", &w, 4, 1).unwrap());
        o.pad_to = 4;
        let p = permute(
            Matrix::new("x", &x, 4, 1).unwrap(),
            Matrix::new("expert_idx", &idx, 4, 1).unwrap(),
            &o,
        )
        .unwrap();
        // keeps token 1 (0.9) and token 0 (earliest of the 0.5s), in flat order, then padding.
        assert_eq!(p.order, vec![0, 1, -1, -1]);
        assert_eq!(p.counts, vec![4, 0]);
        assert_eq!(p.x_sorted, vec![1.0, 2.0, 0.0, 0.0]);
    }

    #[test]
    fn rejects_inconsistent_input() {
        let x = [0.0f32; 4];
        let xm = Matrix::new("x", &x, 2, 2).unwrap();
        let bad = [0, 3];
        let err =
            permute(xm, Matrix::new("expert_idx", &bad, 2, 1).unwrap(), &opts(3)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert_idx[1, 0]: expected an expert index in [0, 3), got 3"
        );
        let ok = [0, 1];
        let mut o = opts(3);
        o.capacity = Some(1);
        let err = permute(xm, Matrix::new("expert_idx", &ok, 2, 1).unwrap(), &o).unwrap_err();
        assert!(
            err.to_string().starts_with("weights: expected an array"),
            "{err}"
        );
        let mut o = opts(3);
        o.pad_to = 1 << 30;
        let err = permute(xm, Matrix::new("expert_idx", &ok, 2, 1).unwrap(), &o).unwrap_err();
        assert!(err.to_string().starts_with("pad_to: expected"), "{err}");
    }
}
