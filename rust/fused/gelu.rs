//! GELU (tanh approximation, as GPT-2 and `torch.nn.functional.gelu(approximate="tanh")`) and
//! its backward, each one pass over memory, in parallel chunks.

use rayon::prelude::*;

use crate::linalg::fastmath::tanh;
use crate::linalg::simd::vectorized;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044_715;
const CHUNK: usize = 1 << 14;

/// Why a GELU call was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeluError {
    #[error("{what} has {got} elements, expected {expected} (as many as x)")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

/// `out = 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`.
pub fn gelu_forward(x: &[f32], out: &mut [f32]) -> Result<(), GeluError> {
    if out.len() != x.len() {
        return Err(GeluError::Length {
            what: "out",
            expected: x.len(),
            got: out.len(),
        });
    }
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| gelu_serial(x, o));
    Ok(())
}

/// [`gelu_forward`] on the calling thread, for kernels that already split the work (the
/// fused MoE expert FFN applies it to each tile right after its GEMM). Same arithmetic, so
/// the same bits. Stops at the shorter slice.
pub(crate) fn gelu_serial(x: &[f32], out: &mut [f32]) {
    vectorized(
        #[inline(always)]
        || {
            for (o, &v) in out.iter_mut().zip(x) {
                let t = tanh(SQRT_2_OVER_PI * (v + COEF * v * v * v));
                *o = 0.5 * v * (1.0 + t);
            }
        },
    )
}

/// `g *= gelu'(x)` on the calling thread: [`gelu_backward`] in place, same arithmetic.
pub(crate) fn gelu_backward_in_place(g: &mut [f32], x: &[f32]) {
    vectorized(
        #[inline(always)]
        || {
            for (g, &v) in g.iter_mut().zip(x) {
                *g = gelu_derivative_times(*g, v);
            }
        },
    )
}

#[inline(always)]
fn gelu_derivative_times(g: f32, v: f32) -> f32 {
    let t = tanh(SQRT_2_OVER_PI * (v + COEF * v * v * v));
    let inner = SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * v * v);
    g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * inner)
}

/// `dx = g · d gelu(x)/dx`.
pub fn gelu_backward(g: &[f32], x: &[f32], dx: &mut [f32]) -> Result<(), GeluError> {
    for (what, got) in [("g", g.len()), ("dx", dx.len())] {
        if got != x.len() {
            return Err(GeluError::Length {
                what,
                expected: x.len(),
                got,
            });
        }
    }
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((d, x), g)| {
            vectorized(
                #[inline(always)]
                || {
                    for ((d, &v), &g) in d.iter_mut().zip(x).zip(g) {
                        *d = gelu_derivative_times(g, v);
                    }
                },
            )
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gelu64(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    }

    #[test]
    fn forward_and_backward_match_f64() {
        let x: Vec<f32> = (0..40_001)
            .map(|i| (i as f32 - 20_000.0) / 2_000.0)
            .collect();
        let mut y = vec![0.0; x.len()];
        gelu_forward(&x, &mut y).unwrap();
        let g = vec![1.0f32; x.len()];
        let mut dx = vec![0.0; x.len()];
        gelu_backward(&g, &x, &mut dx).unwrap();
        for ((&v, &yv), &dv) in x.iter().zip(&y).zip(&dx) {
            let v = f64::from(v);
            assert!(
                (f64::from(yv) - gelu64(v)).abs() < 1e-6 * (1.0 + v.abs()),
                "gelu({v})"
            );
            let numeric = (gelu64(v + 1e-6) - gelu64(v - 1e-6)) / 2e-6;
            assert!(
                (f64::from(dv) - numeric).abs() < 1e-5,
                "gelu'({v}): {dv} vs {numeric}"
            );
        }
    }

    #[test]
    fn refuses_mismatched_lengths() {
        assert_eq!(
            gelu_forward(&[0.0; 3], &mut [0.0; 2]),
            Err(GeluError::Length {
                what: "out",
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            gelu_backward(&[0.0; 2], &[0.0; 3], &mut [0.0; 3]),
            Err(GeluError::Length {
                what: "g",
                expected: 3,
                got: 2
            })
        );
    }
}
