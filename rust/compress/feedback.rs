//! The whole compression step: selection with error feedback (or DGC momentum correction)
//! fused into the selecting pass, then encoding, then the sent entries' residuals.

use super::codec::{encode_checked, Encoding, Rounding};
use super::scan::{first_nonfinite, Sweep};
use super::select::{select_sweep, Method};
use super::CompressError;

/// The state carried from one step to the next for one tensor.
pub enum Feedback<'a> {
    /// No memory: what is not sent is dropped.
    None,
    /// Error feedback: the residual r of everything not sent (and of the encoding's loss).
    Residual(&'a mut [f32]),
    /// DGC momentum correction: velocity `u` and accumulator `v`, momentum `m`.
    Momentum {
        u: &'a mut [f32],
        v: &'a mut [f32],
        m: f32,
    },
}

impl Feedback<'_> {
    fn check_len(&self, n: usize) -> Result<(), CompressError> {
        let mut bufs: Vec<(&'static str, usize)> = Vec::new();
        match self {
            Feedback::None => {}
            Feedback::Residual(r) => bufs.push(("residual", r.len())),
            Feedback::Momentum { u, v, .. } => {
                bufs.push(("momentum velocity", u.len()));
                bufs.push(("momentum accumulator", v.len()));
            }
        }
        match bufs.into_iter().find(|&(_, len)| len != n) {
            Some((what, got)) => Err(CompressError::LengthMismatch {
                what,
                got,
                expected: n,
            }),
            None => Ok(()),
        }
    }
}

/// Compresses `grad` to a payload carrying k entries, updating `feedback` in place:
/// - `None`: select on `grad`.
/// - `Residual(r)`: `r ← r + grad`, select on `r`, then `r[i] ← r[i] − decoded(r[i])` at the
///   sent entries (zero for f32 values).
/// - `Momentum { u, v, m }`: `u ← m·u + grad; v ← v + u`, select on `v`, then at the sent
///   entries `v[i] ← v[i] − decoded(v[i])` and `u[i] ← 0`.
///
/// `grad` is only read. A non-finite gradient is an error that leaves the state untouched;
/// if the state itself overflows float32 it is reset to zeros and the error says so.
pub fn compress_topk(
    grad: &[f32],
    feedback: Feedback<'_>,
    k: usize,
    method: Method,
    encoding: &Encoding,
) -> Result<Vec<u8>, CompressError> {
    let n = grad.len();
    encoding.validate_for(n, k)?;
    feedback.check_len(n)?;
    if let Feedback::Momentum { m, .. } = feedback {
        if !(m.is_finite() && m >= 0.0) {
            return Err(CompressError::InvalidArgument(format!(
                "momentum must be finite and >= 0, got {m}"
            )));
        }
    }
    let stateful = !matches!(feedback, Feedback::None);
    if stateful {
        // Checked before the state is touched so that a bad step leaves it as it was.
        if let Some(index) = first_nonfinite(grad) {
            return Err(CompressError::NonFinite {
                what: "gradient",
                index,
                value: grad[index],
            });
        }
    }
    let mut sweep = match feedback {
        Feedback::None => Sweep::Read(grad),
        Feedback::Residual(acc) => Sweep::Accumulate { grad, acc },
        Feedback::Momentum { u, v, m } => Sweep::Momentum { grad, u, v, m },
    };
    let what = if stateful {
        "error-feedback accumulator (float32 overflow; the state was reset to zeros)"
    } else {
        "gradient"
    };
    let indices = match select_sweep(&mut sweep, k, method, what) {
        Ok(ix) => ix,
        Err(e) => {
            if stateful && matches!(e, CompressError::NonFinite { .. }) {
                reset(&mut sweep);
            }
            return Err(e);
        }
    };
    let selected = sweep.values();
    let values: Vec<f32> = indices.iter().map(|&i| selected[i as usize]).collect();
    let mut decoded = Vec::new();
    let payload = encode_checked(
        n,
        &indices,
        &values,
        encoding,
        Rounding::Nearest,
        stateful.then_some(&mut decoded),
    )?;
    match &mut sweep {
        Sweep::Read(_) => {}
        Sweep::Accumulate { acc, .. } => {
            for ((&i, &v), &d) in indices.iter().zip(&values).zip(&decoded) {
                acc[i as usize] = v - d;
            }
        }
        Sweep::Momentum { u, v: acc, .. } => {
            for ((&i, &v), &d) in indices.iter().zip(&values).zip(&decoded) {
                acc[i as usize] = v - d;
                u[i as usize] = 0.0;
            }
        }
    }
    Ok(payload)
}

fn reset(sweep: &mut Sweep<'_>) {
    match sweep {
        Sweep::Read(_) => {}
        Sweep::Accumulate { acc, .. } => acc.fill(0.0),
        Sweep::Momentum { u, v, .. } => {
            u.fill(0.0);
            v.fill(0.0);
        }
    }
}
