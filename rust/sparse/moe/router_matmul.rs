//! The router's two matrix products, forward (`logits = x · wᵀ`) and backward, on the
//! `gemm` doorway.
//!
//! Why not numpy's `@`: these are thin products (E = 8 columns), and numpy's multithreaded
//! OpenBLAS keeps its worker threads spinning for a while after each call; in the middle of
//! an MoE layer whose other kernels run on rayon's threads, those spinning workers took the
//! cores from rayon (measured: a layer's CPU time went from 182 ms with one OpenBLAS thread
//! to 300 ms with two, and the router products from 1 ms to 90 ms wall). Here everything
//! runs on rayon's pool.

use super::error::MoeError;
use super::matrix::Matrix;
use crate::linalg::buffers::zeroed;
use crate::linalg::gemm::{matmul, matmul_add, Strided};

fn check_router(x: Matrix<'_, f32>, w: Matrix<'_, f32>) -> Result<(), MoeError> {
    if w.cols() != x.cols() {
        return Err(MoeError::shape(
            "router_w",
            format!("[E, {}] (d of x)", x.cols()),
            w.shape(),
        ));
    }
    Ok(())
}

fn row_major<'a>(m: &Matrix<'a, f32>) -> Strided<'a> {
    Strided {
        data: m.data(),
        rs: m.cols(),
        cs: 1,
    }
}

fn transposed<'a>(m: &Matrix<'a, f32>) -> Strided<'a> {
    Strided {
        data: m.data(),
        rs: 1,
        cs: m.cols(),
    }
}

/// `logits[T, E] = x[T, d] · router_w[E, d]ᵀ`.
pub fn router_logits(x: Matrix<'_, f32>, router_w: Matrix<'_, f32>) -> Result<Vec<f32>, MoeError> {
    check_router(x, router_w)?;
    let (t, d, e) = (x.rows(), x.cols(), router_w.rows());
    let mut logits = zeroed("logits", t.saturating_mul(e))?;
    matmul(
        (t, e, d),
        &mut logits,
        e,
        row_major(&x),
        transposed(&router_w),
        true,
    );
    Ok(logits)
}

/// Backward of [`router_logits`]: adds `d_logits · router_w` to `d_x` (`[T, d]`, the
/// gradient the rest of the layer already gave `x`) and returns
/// `d_router_w[E, d] = d_logitsᵀ · x`.
pub fn router_backward(
    d_logits: Matrix<'_, f32>,
    x: Matrix<'_, f32>,
    router_w: Matrix<'_, f32>,
    d_x: &mut [f32],
) -> Result<Vec<f32>, MoeError> {
    check_router(x, router_w)?;
    let (t, d, e) = (x.rows(), x.cols(), router_w.rows());
    d_logits.expect_shape("d_logits", t, e)?;
    if d_x.len() != t.saturating_mul(d) {
        return Err(MoeError::shape(
            "d_x",
            format!("[{t}, {d}] (shape of x)"),
            format!("{} elements", d_x.len()),
        ));
    }
    matmul_add(
        (t, d, e),
        d_x,
        d,
        row_major(&d_logits),
        row_major(&router_w),
        true,
    );
    let mut d_w = zeroed("d_router_w", e.saturating_mul(d))?;
    matmul(
        (e, d, t),
        &mut d_w,
        d,
        transposed(&d_logits),
        row_major(&x),
        true,
    );
    Ok(d_w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_naive_sums() {
        let (t, d, e) = (37, 11, 5);
        let x: Vec<f32> = (0..t * d).map(|i| ((i * 13 % 17) as f32) - 8.0).collect();
        let w: Vec<f32> = (0..e * d).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
        let g: Vec<f32> = (0..t * e).map(|i| ((i * 5 % 9) as f32) - 4.0).collect();
        let xm = Matrix::new("x", &x, t, d).unwrap();
        let wm = Matrix::new("w", &w, e, d).unwrap();
        let gm = Matrix::new("g", &g, t, e).unwrap();
        let logits = router_logits(xm, wm).unwrap();
        for i in 0..t {
            for j in 0..e {
                let want: f32 = (0..d).map(|p| x[i * d + p] * w[j * d + p]).sum();
                assert_eq!(logits[i * e + j], want, "small integers are exact");
            }
        }
        let mut dx: Vec<f32> = (0..t * d).map(|i| i as f32).collect();
        let dw = router_backward(gm, xm, wm, &mut dx).unwrap();
        for i in 0..t {
            for p in 0..d {
                let want: f32 = (0..e).map(|j| g[i * e + j] * w[j * d + p]).sum();
                assert_eq!(dx[i * d + p], want + (i * d + p) as f32);
            }
        }
        for j in 0..e {
            for p in 0..d {
                let want: f32 = (0..t).map(|i| g[i * e + j] * x[i * d + p]).sum();
                assert_eq!(dw[j * d + p], want);
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let x = [0.0f32; 12];
        let xm = Matrix::new("x", &x, 4, 3).unwrap();
        let wm = Matrix::new("w", &x, 3, 4).unwrap();
        let err = router_logits(xm, wm).unwrap_err();
        assert!(matches!(
            err,
            MoeError::Shape {
                arg: "router_w",
                ..
            }
        ));
        let wm = Matrix::new("w", &x[..6], 2, 3).unwrap();
        let gm = Matrix::new("g", &x, 3, 4).unwrap();
        let err = router_backward(gm, xm, wm, &mut [0.0; 12]).unwrap_err();
        assert!(matches!(
            err,
            MoeError::Shape {
                arg: "d_logits",
                ..
            }
        ));
        let gm = Matrix::new("g", &x[..8], 4, 2).unwrap();
        let err = router_backward(gm, xm, wm, &mut [0.0; 11]).unwrap_err();
        assert!(matches!(err, MoeError::Shape { arg: "d_x", .. }));
    }
}
