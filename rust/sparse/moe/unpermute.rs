//! Unpermute: each token's rows weighted and summed back into `[T, d]`, and its backward.
//!
//! Threads own their outputs: every token gathers its (at most k) rows through an inverse
//! index of `order`, so nothing is scattered and no atomics are needed.

use std::mem::MaybeUninit;

use super::error::MoeError;
use super::matrix::Matrix;
use super::par::{rows_per_block, run, MEMORY_BOUND};
use super::permute::gather_rows;
use crate::linalg::buffers::{filled, write_scaled, write_zeros, zeroed};

/// What [`unpermute_backward`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpermuteGrads {
    /// `[R, d]`: `weights[t, j] · dy[t]` for the row of assignment `t·k + j`, 0 on padding.
    pub d_y_sorted: Vec<f32>,
    /// `[T, k]`: `dy[t] · y_sorted[r]` for the row r of assignment `t·k + j`, 0 if dropped.
    pub d_weights: Vec<f32>,
}

/// `y[t] = Σ_j weights[t, j] · y_sorted[r]` over the rows `r` with `order[r] = t·k + j`
/// (weight 1 when `weights` is `None`); padding rows (`-1`) and dropped assignments add
/// nothing. `order` must name each assignment at most once.
pub fn unpermute(
    y_sorted: Matrix<'_, f32>,
    order: &[i32],
    weights: Option<Matrix<'_, f32>>,
    n_tokens: usize,
    k: usize,
) -> Result<Vec<f32>, MoeError> {
    let inverse = inverse_order(order, y_sorted.rows(), n_tokens, k)?;
    if let Some(w) = weights {
        w.expect_shape("weights", n_tokens, k)?;
    }
    let d = y_sorted.cols();
    let fill = |out: &mut [MaybeUninit<f32>]| {
        if d == 0 {
            return;
        }
        let rows = rows_per_block(n_tokens, d * 4 * (k + 1), MEMORY_BOUND);
        let blocks: Vec<_> = out
            .chunks_mut(rows * d)
            .zip(inverse.chunks(rows * k))
            .collect();
        run(blocks, |block, (dst, inv)| {
            for (i, (row, slots)) in dst.chunks_mut(d).zip(inv.chunks(k)).enumerate() {
                let first = (block * rows + i) * k;
                let weight = |j: usize| weights.map_or(1.0, |w| w.data()[first + j]);
                let mut kept = slots
                    .iter()
                    .enumerate()
                    .filter(|&(_, &r)| r >= 0)
                    .map(|(j, &r)| (weight(j), y_sorted.row(r as usize)));
                match (kept.next(), kept.next()) {
                    (None, _) => write_zeros(row),
                    (Some((w0, a)), None) => write_scaled(row, w0, a),
                    (Some((w0, a)), Some((w1, b))) => {
                        for ((o, &x0), &x1) in row.iter_mut().zip(a).zip(b) {
                            o.write(w0 * x0 + w1 * x1);
                        }
                        // SAFETY: every element of `row` was written just above.
                        let row = unsafe { assume_init_mut(row) };
                        for (w, src) in kept {
                            axpy(w, src, row);
                        }
                    }
                }
            }
        });
    };
    // SAFETY: `out` has n_tokens · d elements in blocks of `rows` tokens, paired with the
    // blocks of `inverse` (k slots per token); every token's row is written by one of the
    // three arms (zeros, one scaled row, or a sum of at least two). d == 0: nothing to write.
    Ok(unsafe { filled("y", n_tokens.saturating_mul(d), fill) }?)
}

/// `&mut [f32]` view of a slice whose elements have all been written.
///
/// # Safety
/// Every element of `s` must be initialised.
unsafe fn assume_init_mut(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has the layout of f32 and the caller guarantees every element
    // is initialised; the new slice borrows `s` mutably, so nothing else can alias it.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len()) }
}

/// The backward of `permute` with respect to `x`: `dx[t] = Σ_j dx_sorted[row of t·k + j]`,
/// i.e. [`unpermute`] with unit weights.
pub fn permute_backward(
    dx_sorted: Matrix<'_, f32>,
    order: &[i32],
    n_tokens: usize,
    k: usize,
) -> Result<Vec<f32>, MoeError> {
    unpermute(dx_sorted, order, None, n_tokens, k)
}

/// The backward of [`unpermute`] for `dy` (`[T, d]`): the gradients of `y_sorted` and of
/// `weights` (`[T, k]`).
pub fn unpermute_backward(
    dy: Matrix<'_, f32>,
    y_sorted: Matrix<'_, f32>,
    order: &[i32],
    weights: Matrix<'_, f32>,
) -> Result<UnpermuteGrads, MoeError> {
    let (t, k, d) = (weights.rows(), weights.cols(), y_sorted.cols());
    dy.expect_shape("dy", t, d)?;
    let inverse = inverse_order(order, y_sorted.rows(), t, k)?;
    let mut d_weights = zeroed("d_weights", t * k)?;
    if d == 0 {
        return Ok(UnpermuteGrads {
            d_y_sorted: Vec::new(),
            d_weights,
        });
    }
    let rows = rows_per_block(order.len(), d * 4 * 3, MEMORY_BOUND);
    if rows >= order.len() {
        // One thread: a single pass over the sorted rows reads each dy row once for both
        // gradients (d_weights is written at the row's assignment, unique by validation).
        let fill = |out: &mut [MaybeUninit<f32>]| {
            for (r, (row, &o)) in out.chunks_mut(d).zip(order).enumerate() {
                if o < 0 {
                    write_zeros(row);
                    continue;
                }
                let g = dy.row(o as usize / k);
                write_scaled(row, weights.data()[o as usize], g);
                d_weights[o as usize] = dot(g, y_sorted.row(r));
            }
        };
        // SAFETY: `out` has order.len() · d elements, one d-wide row per entry of `order`,
        // and every row is written (zeros for padding, a scaled dy row otherwise).
        let d_y_sorted = unsafe { filled("d_y_sorted", order.len() * d, fill) }?;
        return Ok(UnpermuteGrads {
            d_y_sorted,
            d_weights,
        });
    }
    // Several threads: each output in its own pass, so every thread owns what it writes.
    let d_y_sorted = gather_rows("d_y_sorted", dy, order, k, Some(weights.data()))?;
    let tokens = rows_per_block(t, d * 4 * (k + 1), 0);
    let blocks: Vec<_> = d_weights
        .chunks_mut(tokens * k)
        .zip(inverse.chunks(tokens * k))
        .collect();
    run(blocks, |block, (dw, inv)| {
        for (i, (g, slots)) in dw.chunks_mut(k).zip(inv.chunks(k)).enumerate() {
            let tok = block * tokens + i;
            for (gj, &r) in g.iter_mut().zip(slots) {
                if r >= 0 {
                    *gj = dot(dy.row(tok), y_sorted.row(r as usize));
                }
            }
        }
    });
    Ok(UnpermuteGrads {
        d_y_sorted,
        d_weights,
    })
}

/// `inverse[t·k + j]` = the row of `order` holding assignment `t·k + j`, or -1 if none.
///
/// Validates `order` (`n_rows` entries, each in `[-1, T·k)`, no assignment twice), which is
/// what makes every later index in bounds.
pub(crate) fn inverse_order(
    order: &[i32],
    n_rows: usize,
    n_tokens: usize,
    k: usize,
) -> Result<Vec<i32>, MoeError> {
    if order.len() != n_rows {
        return Err(MoeError::shape(
            "order",
            format!("[{n_rows}] (one entry per sorted row)"),
            format!("[{}]", order.len()),
        ));
    }
    if k == 0 {
        return Err(MoeError::value("k", "an integer >= 1", 0));
    }
    let tk = n_tokens
        .checked_mul(k)
        .filter(|&tk| i32::try_from(tk).is_ok())
        .ok_or_else(|| {
            MoeError::value(
                "n_tokens",
                "n_tokens * k below 2^31 (order is int32)",
                format!("{n_tokens} * {k}"),
            )
        })?;
    if i32::try_from(n_rows).is_err() {
        return Err(MoeError::shape(
            "order",
            "fewer than 2^31 rows",
            format!("[{n_rows}]"),
        ));
    }
    let mut inverse = vec![-1i32; tk];
    for (r, &o) in order.iter().enumerate() {
        if o == -1 {
            continue;
        }
        if o < -1 || o as usize >= tk {
            return Err(MoeError::entry(
                "order",
                &[r],
                format!("-1 (padding) or an assignment index in [0, n_tokens * k = {tk})"),
                o,
            ));
        }
        let slot = &mut inverse[o as usize];
        if *slot >= 0 {
            return Err(MoeError::entry(
                "order",
                &[r],
                format!(
                    "each assignment at most once, but row {} already holds it",
                    *slot
                ),
                o,
            ));
        }
        // r < n_rows < 2^31, checked above.
        *slot = r as i32;
    }
    Ok(inverse)
}

#[inline]
fn axpy(w: f32, x: &[f32], y: &mut [f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += w * b;
    }
}

/// A dot product with eight independent partial sums, so the compiler can vectorise it
/// (a single running sum would pin the order of the additions).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_sum_by_hand() {
        // T = 2, k = 2, d = 2; rows: a(t0,j1) pad b(t1,j0) c(t0,j0); t1,j1 dropped.
        let y_sorted = [1.0f32, 2.0, 9.0, 9.0, 3.0, 4.0, 5.0, 6.0];
        let order = [1, -1, 2, 0];
        let w = [0.5f32, 0.25, 2.0, 7.0];
        let ys = Matrix::new("y_sorted", &y_sorted, 4, 2).unwrap();
        let wm = Matrix::new("weights", &w, 2, 2).unwrap();
        let y = unpermute(ys, &order, Some(wm), 2, 2).unwrap();
        assert_eq!(
            y,
            vec![0.5 * 5.0 + 0.25 * 1.0, 0.5 * 6.0 + 0.25 * 2.0, 6.0, 8.0]
        );
        let dy = [1.0f32, -1.0, 2.0, 0.5];
        let g = unpermute_backward(Matrix::new("dy", &dy, 2, 2).unwrap(), ys, &order, wm).unwrap();
        assert_eq!(
            g.d_y_sorted,
            vec![0.25, -0.25, 0.0, 0.0, 4.0, 1.0, 0.5, -0.5]
        );
        assert_eq!(g.d_weights, vec![5.0 - 6.0, 1.0 - 2.0, 6.0 + 2.0, 0.0]);
    }

    #[test]
    fn rejects_out_of_range_and_duplicate_order() {
        let ys = [0.0f32; 3];
        let ym = Matrix::new("y_sorted", &ys, 3, 1).unwrap();
        let err = unpermute(ym, &[0, 4, -1], None, 2, 2).unwrap_err();
        assert!(err.to_string().starts_with("order[1]: expected -1 (padding) or an assignment index in [0, n_tokens * k = 4), got 4"), "{err}");
        let err = unpermute(ym, &[0, -2, -1], None, 2, 2).unwrap_err();
        assert!(err.to_string().starts_with("order[1]"), "{err}");
        let err = unpermute(ym, &[3, 1, 3], None, 2, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "order[2]: expected each assignment at most once, but row 0 already holds it, got 3"
        );
        let err = unpermute(ym, &[0, 1], None, 2, 2).unwrap_err();
        assert!(matches!(err, MoeError::Shape { arg: "order", .. }));
    }

    #[test]
    fn dot_matches_naive_on_odd_lengths() {
        for n in [0usize, 1, 7, 8, 9, 31] {
            let a: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert_eq!(dot(&a, &b), naive);
        }
    }
}
