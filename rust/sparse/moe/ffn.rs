//! The GELU expert FFN (`gelu(x_e · w1[e]) · w2[e]` for every expert's block of rows) as one
//! kernel, forward and backward.
//!
//! Why fused: run as separate grouped matmuls plus a GELU pass, every step is its own
//! parallel phase, the GELU reads and writes the whole hidden activation again, and the
//! biggest experts run one at a time with gemm's own threading. Here the rows of each expert
//! are cut into tiles that each run the whole chain on one thread (GEMM, GELU while the tile
//! is in cache, second GEMM; backward: `dy · w2ᵀ`, GELU', `· w1ᵀ`), all tiles side by side;
//! the weight gradients are tiles of the same pool (`dW2` alongside the row tiles, `dW1`
//! once the hidden gradient is complete). Two threads thus stay busy through the whole layer
//! with two synchronisation points instead of seven.

use super::error::MoeError;
use super::grouped::{offsets, shared_tiles, split_by_tiles, MatrixStack, Tile};
use super::matrix::Matrix;
use super::par::run;
use crate::fused::gelu::{gelu_backward_in_place, gelu_serial};
use crate::linalg::bf16::{matmul_elem, Elem, Panels, View};
use crate::linalg::buffers::zeroed;
use half::bf16;

/// Tiles per thread: enough for experts of uneven size to balance over the threads, few
/// enough that each GEMM stays large (each packs its expert's weight matrix once).
const TILES_PER_THREAD: usize = 8;

/// What the forward computed: `h = x · w1` and `a = gelu(h)` (`[R, hidden]`, kept for the
/// backward) and the output `y = a · w2` (`[R, d_out]`), in the activations' type (f32 or
/// bf16; for bf16, `y` is computed from the f32 `a` before it is rounded).
#[derive(Debug)]
pub struct FfnForward<T = f32> {
    pub h: Vec<T>,
    pub a: Vec<T>,
    pub y: Vec<T>,
}

/// Gradients of the loss with respect to `x_sorted` (`[R, d_in]`, the activations' type),
/// `w1` and `w2` (always f32: they feed the f32 master weights).
#[derive(Debug)]
pub struct FfnGrads<T = f32> {
    pub d_x: Vec<T>,
    pub d_w1: Vec<f32>,
    pub d_w2: Vec<f32>,
}

/// The shapes the FFN is made of, checked once.
#[derive(Clone, Copy)]
struct Dims {
    d_in: usize,
    hidden: usize,
    d_out: usize,
}

fn check<T>(
    x_sorted: Matrix<'_, T>,
    counts: &[i32],
    w1: MatrixStack<'_, T>,
    w2: MatrixStack<'_, T>,
) -> Result<(Dims, Vec<usize>), MoeError> {
    if w2.n != w1.n || w2.rows != w1.cols {
        return Err(MoeError::shape(
            "w2",
            format!(
                "[{}, {}, d_out] (experts and hidden size of w1)",
                w1.n, w1.cols
            ),
            format!("[{}, {}, {}]", w2.n, w2.rows, w2.cols),
        ));
    }
    if x_sorted.cols() != w1.rows {
        return Err(MoeError::shape(
            "x_sorted",
            format!("[R, {}] (d_in of w1)", w1.rows),
            x_sorted.shape(),
        ));
    }
    let off = offsets(counts, w1.n, x_sorted.rows(), "x_sorted")?;
    let dims = Dims {
        d_in: w1.rows,
        hidden: w1.cols,
        d_out: w2.cols,
    };
    Ok((dims, off))
}

fn sizes(off: &[usize]) -> Vec<usize> {
    off.windows(2).map(|p| p[1] - p[0]).collect()
}

/// Row-major rows `[row0, row0 + ..)` of a matrix with `cols` columns, as a GEMM operand.
fn rows_of<T>(data: &[T], row0: usize, cols: usize) -> View<'_, T> {
    View {
        data: &data[row0 * cols..],
        rs: cols,
        cs: 1,
    }
}

/// The transpose of a row-major `[rows, cols]` matrix, as a GEMM operand (no copy: gemm
/// takes the strides).
fn transposed<T>(data: &[T], cols: usize) -> View<'_, T> {
    View {
        data,
        rs: 1,
        cs: cols,
    }
}

/// `y[R, d_out]`: for the rows of expert e in `x_sorted` (`[R, d_in]`, blocks given by
/// `counts`), `gelu_tanh(x_e · w1[e]) · w2[e]` (`w1`: `[E, d_in, hidden]`, `w2`:
/// `[E, hidden, d_out]`), with the hidden pre-activation `h` and activation `a`.
pub fn gelu_ffn_forward(
    x_sorted: Matrix<'_, f32>,
    counts: &[i32],
    w1: MatrixStack<'_>,
    w2: MatrixStack<'_>,
) -> Result<FfnForward, MoeError> {
    forward_of(x_sorted, counts, w1, w2)
}

/// [`gelu_ffn_forward`] for bf16 rows and weights: each GEMM accumulates in f32 (the bf16
/// doorway), the GELU runs on the f32 tile, and `h`, `a`, `y` are rounded once into bf16.
pub fn gelu_ffn_forward_bf16(
    x_sorted: Matrix<'_, bf16>,
    counts: &[i32],
    w1: MatrixStack<'_, bf16>,
    w2: MatrixStack<'_, bf16>,
) -> Result<FfnForward<bf16>, MoeError> {
    forward_of(x_sorted, counts, w1, w2)
}

fn forward_of<T: Elem>(
    x_sorted: Matrix<'_, T>,
    counts: &[i32],
    w1: MatrixStack<'_, T>,
    w2: MatrixStack<'_, T>,
) -> Result<FfnForward<T>, MoeError> {
    let (dims, off) = check(x_sorted, counts, w1, w2)?;
    let Dims {
        d_in,
        hidden,
        d_out,
    } = dims;
    let rows = x_sorted.rows();
    let mut h = zeroed("h", rows.saturating_mul(hidden))?;
    let mut a = zeroed("a", rows.saturating_mul(hidden))?;
    let mut y = zeroed("y", rows.saturating_mul(d_out))?;
    let work = shared_tiles(&sizes(&off), |_| hidden * (d_in + d_out), TILES_PER_THREAD);
    let jobs: Vec<_> = split_by_tiles(&mut h, &work, &off, hidden)
        .into_iter()
        .zip(split_by_tiles(&mut a, &work, &off, hidden))
        .zip(split_by_tiles(&mut y, &work, &off, d_out))
        .map(|(((tile, h), (_, a)), (_, y))| (tile, h, a, y))
        .collect();
    run(jobs, |_, (tile, h, a, y)| {
        let row0 = off[tile.expert] + tile.start;
        let (w1e, w2e) = (
            rows_of(w1.matrix(tile.expert), 0, hidden),
            rows_of(w2.matrix(tile.expert), 0, d_out),
        );
        let mut panels = Panels::default();
        let (mut sh, mut sa, mut sy) = (Vec::new(), Vec::new(), Vec::new());
        T::through_f32(h, &mut sh, |h| {
            let x = rows_of(x_sorted.data(), row0, d_in);
            matmul_elem(
                (tile.len, hidden, d_in),
                h,
                hidden,
                x,
                w1e,
                false,
                false,
                &mut panels,
            );
            T::through_f32(a, &mut sa, |a| {
                gelu_serial(h, a);
                T::through_f32(y, &mut sy, |y| {
                    let a = rows_of(&*a, 0, hidden);
                    matmul_elem(
                        (tile.len, d_out, hidden),
                        y,
                        d_out,
                        a,
                        w2e,
                        false,
                        false,
                        &mut panels,
                    );
                });
            });
        });
    });
    Ok(FfnForward { h, a, y })
}

/// One unit of the backward's first phase.
enum Phase1<'b, T> {
    /// Rows of one expert: `d_h = (d_y · w2[e]ᵀ) ⊙ gelu'(h)`, then `d_x = d_h · w1[e]ᵀ`.
    Rows(Tile, &'b mut [f32], &'b mut [T]),
    /// Rows `[start, start + len)` of `d_w2[e] = a_eᵀ · d_y_e`.
    WeightGrad(Tile, &'b mut [f32]),
}

/// Backward of [`gelu_ffn_forward`]: given its inputs, its saved `h` and `a` (`[R, hidden]`)
/// and `d_y` (`[R, d_out]`), the gradients with respect to `x_sorted`, `w1` and `w2`
/// (zeros for experts with no rows).
pub fn gelu_ffn_backward(
    x_sorted: Matrix<'_, f32>,
    counts: &[i32],
    w1: MatrixStack<'_>,
    w2: MatrixStack<'_>,
    h: Matrix<'_, f32>,
    a: Matrix<'_, f32>,
    d_y: Matrix<'_, f32>,
) -> Result<FfnGrads, MoeError> {
    backward_of(x_sorted, counts, w1, w2, h, a, d_y)
}

/// [`gelu_ffn_backward`] for bf16 activations and weights: every GEMM accumulates in f32,
/// the hidden gradient `d_h` stays f32 (a workspace of the kernel), `d_x` is rounded once to
/// bf16 and the weight gradients are f32.
pub fn gelu_ffn_backward_bf16(
    x_sorted: Matrix<'_, bf16>,
    counts: &[i32],
    w1: MatrixStack<'_, bf16>,
    w2: MatrixStack<'_, bf16>,
    h: Matrix<'_, bf16>,
    a: Matrix<'_, bf16>,
    d_y: Matrix<'_, bf16>,
) -> Result<FfnGrads<bf16>, MoeError> {
    backward_of(x_sorted, counts, w1, w2, h, a, d_y)
}

fn backward_of<T: Elem>(
    x_sorted: Matrix<'_, T>,
    counts: &[i32],
    w1: MatrixStack<'_, T>,
    w2: MatrixStack<'_, T>,
    h: Matrix<'_, T>,
    a: Matrix<'_, T>,
    d_y: Matrix<'_, T>,
) -> Result<FfnGrads<T>, MoeError> {
    let (dims, off) = check(x_sorted, counts, w1, w2)?;
    let Dims {
        d_in,
        hidden,
        d_out,
    } = dims;
    let rows = x_sorted.rows();
    h.expect_shape("h", rows, hidden)?;
    a.expect_shape("a", rows, hidden)?;
    d_y.expect_shape("d_y", rows, d_out)?;
    let n_experts = w1.n;
    let sizes = sizes(&off);
    let mut d_h: Vec<f32> = zeroed("d_h", rows.saturating_mul(hidden))?;
    let mut d_x = zeroed("d_x", rows.saturating_mul(d_in))?;
    let mut d_w1 = zeroed("d_w1", n_experts.saturating_mul(d_in * hidden))?;
    let mut d_w2 = zeroed("d_w2", n_experts.saturating_mul(hidden * d_out))?;

    // Weight-gradient tiles cut an expert's [rows, cols] gradient by rows; a gradient row
    // costs n_e · (its columns) multiply-adds. Experts with no rows keep their zeros.
    let weight_rows =
        |n: usize| -> Vec<usize> { sizes.iter().map(|&c| if c > 0 { n } else { 0 }).collect() };
    let row_tiles = shared_tiles(&sizes, |_| hidden * (d_in + d_out), TILES_PER_THREAD);
    let w2_tiles = shared_tiles(&weight_rows(hidden), |e| sizes[e] * d_out, TILES_PER_THREAD);
    let w2_base: Vec<usize> = (0..n_experts).map(|e| e * hidden).collect();
    let mut jobs: Vec<Phase1<'_, T>> = split_by_tiles(&mut d_h, &row_tiles, &off, hidden)
        .into_iter()
        .zip(split_by_tiles(&mut d_x, &row_tiles, &off, d_in))
        .map(|((tile, dh), (_, dx))| Phase1::Rows(tile, dh, dx))
        .collect();
    jobs.extend(
        split_by_tiles(&mut d_w2, &w2_tiles, &w2_base, d_out)
            .into_iter()
            .map(|(tile, dw)| Phase1::WeightGrad(tile, dw)),
    );
    run(jobs, |_, job| match job {
        Phase1::Rows(tile, dh, dx) => {
            let row0 = off[tile.expert] + tile.start;
            let mut panels = Panels::default();
            matmul_elem(
                (tile.len, hidden, d_out),
                dh,
                hidden,
                rows_of(d_y.data(), row0, d_out),
                transposed(w2.matrix(tile.expert), d_out),
                false,
                false,
                &mut panels,
            );
            let mut scratch = Vec::new();
            let h_tile = &h.data()[row0 * hidden..(row0 + tile.len) * hidden];
            gelu_backward_in_place(dh, T::widen(h_tile, &mut scratch));
            T::through_f32(dx, &mut scratch, |dx| {
                matmul_elem(
                    (tile.len, d_in, hidden),
                    dx,
                    d_in,
                    rows_of(&*dh, 0, hidden),
                    transposed(w1.matrix(tile.expert), hidden),
                    false,
                    false,
                    &mut panels,
                );
            });
        }
        Phase1::WeightGrad(tile, dw) => {
            let r0 = off[tile.expert];
            matmul_elem(
                (tile.len, d_out, sizes[tile.expert]),
                dw,
                d_out,
                // a_eᵀ restricted to hidden rows [start, start + len): element (i, r) is
                // a[r0 + r, start + i].
                transposed(&a.data()[r0 * hidden + tile.start..], hidden),
                rows_of(d_y.data(), r0, d_out),
                false,
                false,
                &mut Panels::default(),
            );
        }
    });

    let w1_tiles = shared_tiles(&weight_rows(d_in), |e| sizes[e] * hidden, TILES_PER_THREAD);
    let w1_base: Vec<usize> = (0..n_experts).map(|e| e * d_in).collect();
    let d_h = &d_h;
    run(
        split_by_tiles(&mut d_w1, &w1_tiles, &w1_base, hidden),
        |_, (tile, dw)| {
            let r0 = off[tile.expert];
            matmul_elem(
                (tile.len, hidden, sizes[tile.expert]),
                dw,
                hidden,
                transposed(&x_sorted.data()[r0 * d_in + tile.start..], d_in),
                rows_of(d_h.as_slice(), r0, hidden),
                false,
                false,
                &mut Panels::default(),
            );
        },
    );
    Ok(FfnGrads { d_x, d_w1, d_w2 })
}

#[cfg(test)]
mod tests {
    use super::super::grouped::{grouped_matmul, grouped_matmul_dw, grouped_matmul_dx};
    use super::*;
    use crate::fused::gelu::{gelu_backward, gelu_forward};

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    fn values(n: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 97) as f32 / 48.0 - 1.0) * scale)
            .collect()
    }

    /// The fused kernels agree with the unfused composition (grouped matmuls + GELU), with
    /// empty experts, experts of one row and experts that span several tiles.
    #[test]
    fn matches_grouped_matmuls_and_gelu() {
        let (d_in, hidden, d_out) = (24, 40, 16);
        let counts = [3, 0, 700, 1, 0, 90];
        let e = counts.len();
        let r: usize = counts.iter().map(|&c| c as usize).sum();
        let x = values(r * d_in, 1, 1.0);
        let w1 = values(e * d_in * hidden, 2, 0.3);
        let w2 = values(e * hidden * d_out, 3, 0.3);
        let dy = values(r * d_out, 4, 1.0);
        let xm = Matrix::new("x", &x, r, d_in).unwrap();
        let w1s = MatrixStack::new("w1", &w1, e, d_in, hidden).unwrap();
        let w2s = MatrixStack::new("w2", &w2, e, hidden, d_out).unwrap();

        let h_ref = grouped_matmul(xm, &counts, w1s).unwrap();
        let mut a_ref = vec![0.0; h_ref.len()];
        gelu_forward(&h_ref, &mut a_ref).unwrap();
        let am = Matrix::new("a", &a_ref, r, hidden).unwrap();
        let y_ref = grouped_matmul(am, &counts, w2s).unwrap();
        let fwd = gelu_ffn_forward(xm, &counts, w1s, w2s).unwrap();
        close(&fwd.h, &h_ref, "h");
        close(&fwd.a, &a_ref, "a");
        close(&fwd.y, &y_ref, "y");

        let dym = Matrix::new("dy", &dy, r, d_out).unwrap();
        let da = grouped_matmul_dx(dym, &counts, w2s).unwrap();
        let mut dh = vec![0.0; da.len()];
        gelu_backward(&da, &h_ref, &mut dh).unwrap();
        let dhm = Matrix::new("dh", &dh, r, hidden).unwrap();
        let hm = Matrix::new("h", &fwd.h, r, hidden).unwrap();
        let am = Matrix::new("a", &fwd.a, r, hidden).unwrap();
        let g = gelu_ffn_backward(xm, &counts, w1s, w2s, hm, am, dym).unwrap();
        close(
            &g.d_x,
            &grouped_matmul_dx(dhm, &counts, w1s).unwrap(),
            "d_x",
        );
        close(
            &g.d_w2,
            &grouped_matmul_dw(am, dym, &counts).unwrap(),
            "d_w2",
        );
        close(
            &g.d_w1,
            &grouped_matmul_dw(xm, dhm, &counts).unwrap(),
            "d_w1",
        );
    }

    fn widen(v: &[bf16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    fn round(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    /// Within one bf16 rounding (2^-8 relative) of the f32 kernel run on the same values,
    /// plus the f32 sums' chunking (absolute, scaled by the reduction length).
    fn close_bf16(got: &[bf16], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, &w)) in got.iter().zip(want).enumerate() {
            let g = g.to_f32();
            assert!(
                (g - w).abs() <= 2f32.powi(-8) * w.abs() + 1e-4 * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    /// The bf16 kernels agree with the f32 ones run on the same (bf16-valued) inputs within
    /// the one rounding of their bf16 outputs; the weight gradients (f32) within f32 error.
    #[test]
    fn bf16_matches_f32_on_the_same_values() {
        let (d_in, hidden, d_out) = (24, 300, 16);
        let counts = [3, 0, 300, 1, 0, 90];
        let e = counts.len();
        let r: usize = counts.iter().map(|&c| c as usize).sum();
        let x = round(&values(r * d_in, 1, 1.0));
        let w1 = round(&values(e * d_in * hidden, 2, 0.3));
        let w2 = round(&values(e * hidden * d_out, 3, 0.3));
        let dy = round(&values(r * d_out, 4, 1.0));
        let (x32, w132, w232, dy32) = (widen(&x), widen(&w1), widen(&w2), widen(&dy));
        fn m<T>(v: &[T], rows: usize, cols: usize) -> Matrix<'_, T> {
            Matrix::new("m", v, rows, cols).unwrap()
        }
        let fwd16 = gelu_ffn_forward_bf16(
            m(&x, r, d_in),
            &counts,
            MatrixStack::new("w1", &w1, e, d_in, hidden).unwrap(),
            MatrixStack::new("w2", &w2, e, hidden, d_out).unwrap(),
        )
        .unwrap();
        let (w1s, w2s) = (
            MatrixStack::new("w1", &w132, e, d_in, hidden).unwrap(),
            MatrixStack::new("w2", &w232, e, hidden, d_out).unwrap(),
        );
        let fwd32 = gelu_ffn_forward(m(&x32, r, d_in), &counts, w1s, w2s).unwrap();
        close_bf16(&fwd16.h, &fwd32.h, "h");
        close_bf16(&fwd16.a, &fwd32.a, "a");
        close_bf16(&fwd16.y, &fwd32.y, "y");

        let (h32, a32) = (widen(&fwd16.h), widen(&fwd16.a));
        let g16 = gelu_ffn_backward_bf16(
            m(&x, r, d_in),
            &counts,
            MatrixStack::new("w1", &w1, e, d_in, hidden).unwrap(),
            MatrixStack::new("w2", &w2, e, hidden, d_out).unwrap(),
            m(&fwd16.h, r, hidden),
            m(&fwd16.a, r, hidden),
            m(&dy, r, d_out),
        )
        .unwrap();
        let g32 = gelu_ffn_backward(
            m(&x32, r, d_in),
            &counts,
            w1s,
            w2s,
            m(&h32, r, hidden),
            m(&a32, r, hidden),
            m(&dy32, r, d_out),
        )
        .unwrap();
        close_bf16(&g16.d_x, &g32.d_x, "d_x");
        close(&g16.d_w1, &g32.d_w1, "d_w1");
        close(&g16.d_w2, &g32.d_w2, "d_w2");
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        let x = [0.0f32; 6];
        let w1 = [0.0f32; 12];
        let w2 = [0.0f32; 12];
        let xm = Matrix::new("x", &x, 3, 2).unwrap();
        let w1s = MatrixStack::new("w1", &w1, 2, 2, 3).unwrap();
        let w2s = MatrixStack::new("w2", &w2, 2, 3, 2).unwrap();
        let bad_w2 = MatrixStack::new("w2", &w2, 2, 2, 3).unwrap();
        let err = gelu_ffn_forward(xm, &[1, 2], w1s, bad_w2).unwrap_err();
        assert!(matches!(err, MoeError::Shape { arg: "w2", .. }), "{err}");
        let err = gelu_ffn_forward(xm, &[1, 1], w1s, w2s).unwrap_err();
        assert!(err.to_string().starts_with("counts:"), "{err}");
        let bad_x = Matrix::new("x", &x, 2, 3).unwrap();
        let err = gelu_ffn_forward(bad_x, &[1, 1], w1s, w2s).unwrap_err();
        assert!(matches!(
            err,
            MoeError::Shape {
                arg: "x_sorted",
                ..
            }
        ));
        let hm = Matrix::new("h", &x, 3, 2).unwrap();
        let dym = Matrix::new("dy", &x, 3, 2).unwrap();
        let err = gelu_ffn_backward(xm, &[1, 2], w1s, w2s, hm, hm, dym).unwrap_err();
        assert!(matches!(err, MoeError::Shape { arg: "h", .. }), "{err}");
    }
}
