//! LayerNorm and RMSNorm over the last axis, forward and backward, one pass over memory each.
//!
//! numpy needs about eight passes (mean, centre, square, mean, sqrt, scale, affine) forward
//! and a dozen backward, each through a fresh temporary; a transformer step runs two norms
//! per block. Here a row is read once, kept in cache, and written once. Forward saves only the
//! per-row mean and reciprocal standard deviation; backward recomputes `x̂` from `x`.
//!
//! LayerNorm: `x̂ = (x − mean) · rstd`, `rstd = 1/√(var + eps)`. RMSNorm (`center = false`):
//! mean is 0 and `rstd = 1/√(mean(x²) + eps)`. Then `y = x̂ · w + b` (each optional).

use half::bf16;
use rayon::prelude::*;

use crate::linalg::bf16::Elem;
use crate::linalg::fastmath::{dot_lanes, sum_lanes};
use crate::linalg::simd::vectorized;

/// Rows per parallel task.
const ROWS: usize = 32;

/// The shape and options of one norm call.
#[derive(Clone, Copy, Debug)]
pub struct NormShape {
    /// Number of rows (every leading axis flattened).
    pub rows: usize,
    /// Length of the normalised (last) axis.
    pub cols: usize,
    /// LayerNorm (subtract the mean) or RMSNorm (do not).
    pub center: bool,
    pub eps: f32,
}

/// Why a norm call was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NormError {
    #[error("{what} has {got} elements, expected {expected}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("eps must be positive and finite, got {0}")]
    Eps(f32),
}

fn check(what: &'static str, expected: usize, got: usize) -> Result<(), NormError> {
    if expected == got {
        Ok(())
    } else {
        Err(NormError::Length {
            what,
            expected,
            got,
        })
    }
}

impl NormShape {
    fn validate(&self) -> Result<(), NormError> {
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(NormError::Eps(self.eps));
        }
        Ok(())
    }
}

/// Forward: writes `out` (`rows × cols`), `mean` and `rstd` (`rows` each).
pub fn norm_forward(
    s: NormShape,
    x: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<(), NormError> {
    forward_of(s, x, weight, bias, out, mean, rstd)
}

/// [`norm_forward`] for bf16 `x` and `out`: each task's rows are widened to f32, normalised
/// in f32 (statistics, weight and bias f32) and rounded once into `out`.
pub fn norm_forward_bf16(
    s: NormShape,
    x: &[bf16],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    out: &mut [bf16],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<(), NormError> {
    forward_of(s, x, weight, bias, out, mean, rstd)
}

fn forward_of<T: Elem>(
    s: NormShape,
    x: &[T],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    out: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<(), NormError> {
    s.validate()?;
    let n = s.rows * s.cols;
    check("x", n, x.len())?;
    check("out", n, out.len())?;
    check("mean", s.rows, mean.len())?;
    check("rstd", s.rows, rstd.len())?;
    if let Some(w) = weight {
        check("weight", s.cols, w.len())?;
    }
    if let Some(b) = bias {
        check("bias", s.cols, b.len())?;
    }
    if n == 0 {
        return Ok(());
    }
    let c = s.cols;
    out.par_chunks_mut(ROWS * c)
        .zip(x.par_chunks(ROWS * c))
        .zip(mean.par_chunks_mut(ROWS).zip(rstd.par_chunks_mut(ROWS)))
        .for_each(|((out, x), (mean, rstd))| {
            let mut wide = Vec::new();
            let x = T::widen(x, &mut wide);
            T::through_f32(out, &mut Vec::new(), |out| {
                forward_rows(s, x, weight, bias, out, (mean, rstd))
            });
        });
    Ok(())
}

/// The forward of a task's rows, in f32.
fn forward_rows(
    s: NormShape,
    x: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    (mean, rstd): (&mut [f32], &mut [f32]),
) {
    let c = s.cols;
    vectorized(
        #[inline(always)]
        || {
            for (((o, x), mu), r) in out
                .chunks_mut(c)
                .zip(x.chunks(c))
                .zip(mean.iter_mut())
                .zip(rstd.iter_mut())
            {
                let m = if s.center {
                    sum_lanes(x) / c as f32
                } else {
                    0.0
                };
                // Two passes over a cached row: the centred variance, not E[x²] − m².
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = v - m;
                }
                let var = dot_lanes(o, o) / c as f32;
                let inv = 1.0 / (var + s.eps).sqrt();
                *mu = m;
                *r = inv;
                match (weight, bias) {
                    (Some(w), Some(b)) => {
                        for ((o, &w), &b) in o.iter_mut().zip(w).zip(b) {
                            *o = *o * inv * w + b;
                        }
                    }
                    (Some(w), None) => {
                        for (o, &w) in o.iter_mut().zip(w) {
                            *o = *o * inv * w;
                        }
                    }
                    (None, Some(b)) => {
                        for (o, &b) in o.iter_mut().zip(b) {
                            *o = *o * inv + b;
                        }
                    }
                    (None, None) => {
                        for o in o.iter_mut() {
                            *o *= inv;
                        }
                    }
                }
            }
        },
    )
}

/// `Σ a·b·c` as 16 interleaved partial sums (vectorises).
#[inline(always)]
fn dot3_lanes(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb, cc) = (a.chunks_exact(16), b.chunks_exact(16), c.chunks_exact(16));
    let rest: f32 = (ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder()))
    .map(|((x, y), z)| x * y * z)
    .sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Gradients of one norm call (`dx` in the type of `x`, f32 or bf16).
pub struct NormGrads<'a, T = f32> {
    /// `rows × cols`: the gradient of `x`.
    pub dx: &'a mut [T],
    /// `cols`: the gradient of the weight, if wanted.
    pub dw: Option<&'a mut [f32]>,
    /// `cols`: the gradient of the bias, if wanted.
    pub db: Option<&'a mut [f32]>,
}

/// Backward from `g` (`rows × cols`), the input `x` and the saved `mean`/`rstd`.
pub fn norm_backward(
    s: NormShape,
    g: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    weight: Option<&[f32]>,
    grads: NormGrads<'_>,
) -> Result<(), NormError> {
    backward_of(s, g, x, (mean, rstd), weight, grads)
}

/// [`norm_backward`] for bf16 `g`, `x` and `dx`: each task's rows widened to f32, the
/// gradient computed in f32 and `dx` rounded once; `dw`, `db` f32.
pub fn norm_backward_bf16(
    s: NormShape,
    g: &[bf16],
    x: &[bf16],
    mean: &[f32],
    rstd: &[f32],
    weight: Option<&[f32]>,
    grads: NormGrads<'_, bf16>,
) -> Result<(), NormError> {
    backward_of(s, g, x, (mean, rstd), weight, grads)
}

fn backward_of<T: Elem>(
    s: NormShape,
    g: &[T],
    x: &[T],
    (mean, rstd): (&[f32], &[f32]),
    weight: Option<&[f32]>,
    grads: NormGrads<'_, T>,
) -> Result<(), NormError> {
    s.validate()?;
    let (n, c) = (s.rows * s.cols, s.cols);
    check("g", n, g.len())?;
    check("x", n, x.len())?;
    check("dx", n, grads.dx.len())?;
    check("mean", s.rows, mean.len())?;
    check("rstd", s.rows, rstd.len())?;
    if let Some(w) = weight {
        check("weight", c, w.len())?;
    }
    let want_w = grads.dw.is_some();
    let want_b = grads.db.is_some();
    if let Some(dw) = &grads.dw {
        check("dw", c, dw.len())?;
    }
    if let Some(db) = &grads.db {
        check("db", c, db.len())?;
    }
    if c == 0 {
        return Ok(());
    }
    // dx row by row; dw/db as per-task partial sums, added up at the end.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = grads
        .dx
        .par_chunks_mut(ROWS * c)
        .zip(g.par_chunks(ROWS * c))
        .zip(x.par_chunks(ROWS * c))
        .zip(mean.par_chunks(ROWS).zip(rstd.par_chunks(ROWS)))
        .map(|(((dx, g), x), (mean, rstd))| {
            let mut dw = if want_w { vec![0.0f32; c] } else { Vec::new() };
            let mut db = if want_b { vec![0.0f32; c] } else { Vec::new() };
            let (mut wide_g, mut wide_x) = (Vec::new(), Vec::new());
            let (g, x) = (T::widen(g, &mut wide_g), T::widen(x, &mut wide_x));
            T::through_f32(dx, &mut Vec::new(), |dx| {
                vectorized(
                    #[inline(always)]
                    || {
                        let rows = dx.chunks_mut(c).zip(g.chunks(c)).zip(x.chunks(c));
                        for (((dx, g), x), (&m, &r)) in rows.zip(mean.iter().zip(rstd)) {
                            // dx holds x̂ for now; gh = g·w is formed on the fly.
                            for (d, &v) in dx.iter_mut().zip(x) {
                                *d = (v - m) * r;
                            }
                            if want_w {
                                for ((a, &gv), &h) in dw.iter_mut().zip(g).zip(dx.iter()) {
                                    *a += gv * h;
                                }
                            }
                            if want_b {
                                for (a, &gv) in db.iter_mut().zip(g) {
                                    *a += gv;
                                }
                            }
                            let (sum_gh, sum_ghx) = match weight {
                                Some(w) => (dot_lanes(g, w), dot3_lanes(g, w, dx)),
                                None => (sum_lanes(g), dot_lanes(g, dx)),
                            };
                            let inv_c = 1.0 / c as f32;
                            let a = if s.center { sum_gh * inv_c } else { 0.0 };
                            let b = sum_ghx * inv_c;
                            match weight {
                                Some(w) => {
                                    for ((d, &gv), &wv) in dx.iter_mut().zip(g).zip(w) {
                                        *d = r * (gv * wv - a - *d * b);
                                    }
                                }
                                None => {
                                    for (d, &gv) in dx.iter_mut().zip(g) {
                                        *d = r * (gv - a - *d * b);
                                    }
                                }
                            }
                        }
                    },
                );
            });
            (dw, db)
        })
        .collect();
    if let Some(dw) = grads.dw {
        dw.fill(0.0);
        for (p, _) in &partials {
            dw.iter_mut().zip(p).for_each(|(a, &b)| *a += b);
        }
    }
    if let Some(db) = grads.db {
        db.fill(0.0);
        for (_, p) in &partials {
            db.iter_mut().zip(p).for_each(|(a, &b)| *a += b);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 250.0) - 2.0)
            .collect()
    }

    /// f64 reference of loss = Σ y·probe, returning (y, dx, dw, db).
    fn reference(
        s: NormShape,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        probe: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let c = s.cols;
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
        for r in 0..s.rows {
            let row: Vec<f64> = x[r * c..][..c].iter().map(|&v| f64::from(v)).collect();
            let m = if s.center {
                row.iter().sum::<f64>() / c as f64
            } else {
                0.0
            };
            let var = row.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
            let rs = 1.0 / (var + f64::from(s.eps)).sqrt();
            let xh: Vec<f64> = row.iter().map(|v| (v - m) * rs).collect();
            let g: Vec<f64> = probe[r * c..][..c].iter().map(|&v| f64::from(v)).collect();
            let gh: Vec<f64> = g.iter().zip(w).map(|(g, &w)| g * f64::from(w)).collect();
            let s1: f64 = gh.iter().sum();
            let s2: f64 = gh.iter().zip(&xh).map(|(a, b)| a * b).sum();
            for j in 0..c {
                y[r * c + j] = xh[j] * f64::from(w[j]) + f64::from(b[j]);
                let a = if s.center { s1 / c as f64 } else { 0.0 };
                dx[r * c + j] = rs * (gh[j] - a - xh[j] * s2 / c as f64);
                dw[j] += g[j] * xh[j];
                db[j] += g[j];
            }
        }
        (y, dx, dw, db)
    }

    fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn matches_an_f64_reference_for_layer_and_rms_norm() {
        for &(rows, cols) in &[(1usize, 1usize), (3, 17), (70, 64), (33, 256)] {
            for center in [true, false] {
                let s = NormShape {
                    rows,
                    cols,
                    center,
                    eps: 1e-5,
                };
                let x = data(rows * cols, 1);
                let w = data(cols, 2);
                let b = data(cols, 3);
                let probe = data(rows * cols, 4);
                let (y_ref, dx_ref, dw_ref, db_ref) = reference(s, &x, &w, &b, &probe);
                let mut y = vec![0.0; x.len()];
                let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
                norm_forward(s, &x, Some(&w), Some(&b), &mut y, &mut mean, &mut rstd).unwrap();
                close(&y, &y_ref, 1e-4, "y");
                let (mut dx, mut dw, mut db) =
                    (vec![0.0; x.len()], vec![9.0; cols], vec![9.0; cols]);
                let grads = NormGrads {
                    dx: &mut dx,
                    dw: Some(&mut dw),
                    db: Some(&mut db),
                };
                norm_backward(s, &probe, &x, &mean, &rstd, Some(&w), grads).unwrap();
                close(&dx, &dx_ref, 1e-3, "dx");
                close(&dw, &dw_ref, 1e-3, "dw");
                close(&db, &db_ref, 1e-4, "db");
            }
        }
    }

    #[test]
    fn without_weight_equals_unit_weight() {
        let s = NormShape {
            rows: 5,
            cols: 40,
            center: true,
            eps: 1e-5,
        };
        let x = data(200, 7);
        let g = data(200, 8);
        let ones = vec![1.0f32; 40];
        let run = |w: Option<&[f32]>| {
            let mut y = vec![0.0; 200];
            let (mut m, mut r) = (vec![0.0; 5], vec![0.0; 5]);
            norm_forward(s, &x, w, None, &mut y, &mut m, &mut r).unwrap();
            let mut dx = vec![0.0; 200];
            let grads = NormGrads {
                dx: &mut dx,
                dw: None,
                db: None,
            };
            norm_backward(s, &g, &x, &m, &r, w, grads).unwrap();
            (y, dx)
        };
        let (a, b) = (run(None), run(Some(&ones)));
        for (p, q) in a.0.iter().zip(&b.0).chain(a.1.iter().zip(&b.1)) {
            assert!((p - q).abs() < 1e-5);
        }
    }

    #[test]
    fn refuses_wrong_lengths_and_bad_eps() {
        let s = NormShape {
            rows: 2,
            cols: 3,
            center: true,
            eps: 1e-5,
        };
        let (x, mut y) = (vec![0.0; 6], vec![0.0; 6]);
        let (mut m, mut r) = (vec![0.0; 2], vec![0.0; 2]);
        let err = norm_forward(s, &x[..5], None, None, &mut y, &mut m, &mut r).unwrap_err();
        assert_eq!(
            err,
            NormError::Length {
                what: "x",
                expected: 6,
                got: 5
            }
        );
        let err = norm_forward(s, &x, Some(&[1.0; 2]), None, &mut y, &mut m, &mut r).unwrap_err();
        assert!(matches!(err, NormError::Length { what: "weight", .. }));
        let bad = NormShape { eps: 0.0, ..s };
        let err = norm_forward(bad, &x, None, None, &mut y, &mut m, &mut r).unwrap_err();
        assert_eq!(err, NormError::Eps(0.0));
    }
}
