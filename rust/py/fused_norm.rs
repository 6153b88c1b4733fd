//! Bindings of the fused LayerNorm/RMSNorm kernels (`crate::fused::norm`), used by
//! `moecore.ops.norm` for float32 CPU tensors.

use numpy::ndarray::{Array1, Array2};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::gil::detached;
use crate::fused::norm::{norm_backward, norm_forward, NormError, NormGrads, NormShape};

impl From<NormError> for PyErr {
    fn from(e: NormError) -> PyErr {
        PyValueError::new_err(format!("norm: {e}"))
    }
}

fn slice<'a, D: numpy::ndarray::Dimension>(
    name: &str,
    a: &'a numpy::PyReadonlyArray<'_, f32, D>,
) -> PyResult<&'a [f32]> {
    a.as_slice().map_err(|_| {
        PyValueError::new_err(format!("{name}: expected a C-contiguous float32 array"))
    })
}

fn optional<'a>(
    name: &str,
    a: &'a Option<PyReadonlyArray1<'_, f32>>,
) -> PyResult<Option<&'a [f32]>> {
    a.as_ref().map(|a| slice(name, a)).transpose()
}

type F32_2<'py> = Bound<'py, PyArray2<f32>>;
type F32_1<'py> = Bound<'py, PyArray1<f32>>;

/// LayerNorm (`center=True`) or RMSNorm of the rows of `x` `[rows, cols]` →
/// `(y, mean, rstd)`; `weight`/`bias` `[cols]` optional.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, eps, center))]
pub fn fused_norm_forward<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    weight: Option<PyReadonlyArray1<'py, f32>>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    eps: f32,
    center: bool,
) -> PyResult<(F32_2<'py>, F32_1<'py>, F32_1<'py>)> {
    let (rows, cols) = x.as_array().dim();
    let s = NormShape {
        rows,
        cols,
        center,
        eps,
    };
    let xs = slice("x", &x)?;
    let (w, b) = (optional("weight", &weight)?, optional("bias", &bias)?);
    let mut out = vec![0.0f32; xs.len()];
    let (mut mean, mut rstd) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    detached(py, "norm forward", || {
        norm_forward(s, xs, w, b, &mut out, &mut mean, &mut rstd)
    })??;
    let out = Array2::from_shape_vec((rows, cols), out)
        .map_err(|e| PyValueError::new_err(format!("norm: result shape: {e}")))?;
    Ok((
        out.into_pyarray(py),
        Array1::from_vec(mean).into_pyarray(py),
        Array1::from_vec(rstd).into_pyarray(py),
    ))
}

/// Backward of [`fused_norm_forward`] → `(dx, dw or None, db or None)`.
#[pyfunction]
#[pyo3(signature = (g, x, mean, rstd, weight, eps, center, need_weight, need_bias))]
#[allow(clippy::too_many_arguments)]
pub fn fused_norm_backward<'py>(
    py: Python<'py>,
    g: PyReadonlyArray2<'py, f32>,
    x: PyReadonlyArray2<'py, f32>,
    mean: PyReadonlyArray1<'py, f32>,
    rstd: PyReadonlyArray1<'py, f32>,
    weight: Option<PyReadonlyArray1<'py, f32>>,
    eps: f32,
    center: bool,
    need_weight: bool,
    need_bias: bool,
) -> PyResult<(F32_2<'py>, Option<F32_1<'py>>, Option<F32_1<'py>>)> {
    let (rows, cols) = x.as_array().dim();
    let s = NormShape {
        rows,
        cols,
        center,
        eps,
    };
    let (gs, xs) = (slice("g", &g)?, slice("x", &x)?);
    let (ms, rs) = (slice("mean", &mean)?, slice("rstd", &rstd)?);
    let w = optional("weight", &weight)?;
    let mut dx = vec![0.0f32; xs.len()];
    let mut dw = need_weight.then(|| vec![0.0f32; cols]);
    let mut db = need_bias.then(|| vec![0.0f32; cols]);
    detached(py, "norm backward", || {
        let grads = NormGrads {
            dx: &mut dx,
            dw: dw.as_deref_mut(),
            db: db.as_deref_mut(),
        };
        norm_backward(s, gs, xs, ms, rs, w, grads)
    })??;
    let dx = Array2::from_shape_vec((rows, cols), dx)
        .map_err(|e| PyValueError::new_err(format!("norm: result shape: {e}")))?;
    Ok((
        dx.into_pyarray(py),
        dw.map(|v| Array1::from_vec(v).into_pyarray(py)),
        db.map(|v| Array1::from_vec(v).into_pyarray(py)),
    ))
}
