//! Bindings of the fused dense kernels (`crate::fused`): attention from the packed q/k/v
//! projection, and GELU. Used by `moecore.ops` for float32 CPU tensors.

use numpy::ndarray::{Array, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::gil::detached;
use crate::fused::attention::{
    attention_backward, attention_forward, AttentionError, AttentionShape,
};
use crate::fused::gelu::{gelu_backward, gelu_forward, GeluError};

impl From<AttentionError> for PyErr {
    fn from(e: AttentionError) -> PyErr {
        PyValueError::new_err(format!("attention: {e}"))
    }
}

impl From<GeluError> for PyErr {
    fn from(e: GeluError) -> PyErr {
        PyValueError::new_err(format!("gelu: {e}"))
    }
}

fn contiguous<'a>(name: &str, a: &'a PyReadonlyArrayDyn<'_, f32>) -> PyResult<&'a [f32]> {
    a.as_slice().map_err(|_| {
        PyValueError::new_err(format!("{name}: expected a C-contiguous float32 array"))
    })
}

fn shape_of(qkv: &PyReadonlyArrayDyn<'_, f32>, heads: usize) -> PyResult<AttentionShape> {
    attention_shape(qkv.shape(), heads)
}

/// The attention shape of a packed `qkv` of shape `s` split into `heads` heads.
pub(super) fn attention_shape(s: &[usize], heads: usize) -> PyResult<AttentionShape> {
    if s.len() != 3 || heads == 0 || !s[2].is_multiple_of(3 * heads) {
        return Err(PyValueError::new_err(format!(
            "qkv: expected shape [batch, T, 3 * heads * head_dim] with heads = {heads}, got {s:?}"
        )));
    }
    Ok(AttentionShape {
        batch: s[0],
        seq: s[1],
        heads,
        head_dim: s[2] / (3 * heads),
    })
}

fn array(shape: &[usize], data: Vec<f32>) -> PyResult<Array<f32, IxDyn>> {
    Array::from_shape_vec(IxDyn(shape), data)
        .map_err(|e| PyValueError::new_err(format!("internal shape error: {e}")))
}

type ArrayPair<'py> = (Bound<'py, PyArrayDyn<f32>>, Bound<'py, PyArrayDyn<f32>>);

/// Attention forward from `qkv` `[B, T, 3·H·D]` → `(out [B, T, H·D], probs [B, H, T, T])`.
#[pyfunction]
pub fn fused_attention_forward<'py>(
    py: Python<'py>,
    qkv: PyReadonlyArrayDyn<'py, f32>,
    heads: usize,
    causal: bool,
) -> PyResult<ArrayPair<'py>> {
    let s = shape_of(&qkv, heads)?;
    let src = contiguous("qkv", &qkv)?;
    let (out, probs) = detached(py, "attention forward", || {
        attention_forward(src, s, causal)
    })??;
    let out = array(&[s.batch, s.seq, s.heads * s.head_dim], out)?;
    let probs = array(&[s.batch, s.heads, s.seq, s.seq], probs)?;
    Ok((out.into_pyarray(py), probs.into_pyarray(py)))
}

/// Attention backward from `d_out` `[B, T, H·D]` → `d_qkv` `[B, T, 3·H·D]` (the layout of
/// `qkv`).
#[pyfunction]
pub fn fused_attention_backward<'py>(
    py: Python<'py>,
    qkv: PyReadonlyArrayDyn<'py, f32>,
    probs: PyReadonlyArrayDyn<'py, f32>,
    d_out: PyReadonlyArrayDyn<'py, f32>,
    heads: usize,
    causal: bool,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let s = shape_of(&qkv, heads)?;
    let (src, p, g) = (
        contiguous("qkv", &qkv)?,
        contiguous("probs", &probs)?,
        contiguous("d_out", &d_out)?,
    );
    let d_qkv = detached(py, "attention backward", || {
        attention_backward(src, p, g, s, causal)
    })??;
    Ok(array(qkv.shape(), d_qkv)?.into_pyarray(py))
}

/// GELU (tanh approximation) of a float32 array of any shape.
#[pyfunction]
pub fn fused_gelu<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let src = contiguous("x", &x)?;
    let mut out = vec![0.0f32; src.len()];
    detached(py, "gelu", || gelu_forward(src, &mut out))??;
    Ok(array(x.shape(), out)?.into_pyarray(py))
}

/// Gradient of GELU: `g · gelu'(x)`.
#[pyfunction]
pub fn fused_gelu_backward<'py>(
    py: Python<'py>,
    g: PyReadonlyArrayDyn<'py, f32>,
    x: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let (gs, xs) = (contiguous("g", &g)?, contiguous("x", &x)?);
    let mut dx = vec![0.0f32; xs.len()];
    detached(py, "gelu backward", || gelu_backward(gs, xs, &mut dx))??;
    Ok(array(x.shape(), dx)?.into_pyarray(py))
}
