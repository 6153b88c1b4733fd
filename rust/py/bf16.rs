//! Bindings of the bf16 kernels: the dense bf16 GEMM, the MoE grouped matmuls and fused
//! GELU FFN, RMSNorm/LayerNorm and attention, each reading and writing `half::bf16`.
//!
//! How bf16 arrays cross: numpy has no bf16 of its own (`ml_dtypes.bfloat16` is a
//! user-defined dtype), so the Python side (`moecore.kernels.bf16`) passes each bf16 array
//! as a `uint16` *view* of the same memory (`a.view(np.uint16)`, no copy) and views the
//! `uint16` results back as bf16. Here those `u16` slices are reinterpreted as `bf16` (same
//! size and bits: `half`'s `reinterpret_cast`), and `Vec<bf16>` results are handed to numpy
//! as `Vec<u16>` without copying. Statistics, probabilities and weight gradients are f32.
//! Every heavy call runs with the GIL released ([`detached`]).

use half::bf16;
use half::slice::HalfBitsSliceExt;
use half::vec::HalfFloatVecExt;
use numpy::ndarray::{Array1, Array3, Ix1, Ix2, Ix3};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3, PyReadonlyArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::fused::attention_shape;
use super::gil::detached;
use super::moe::{borrow, data, i32_1d, internal, out2};
use crate::fused::attention::{attention_backward_bf16, attention_forward_bf16};
use crate::fused::norm::{norm_backward_bf16, norm_forward_bf16, NormGrads, NormShape};
use crate::linalg::bf16::matmul_bf16;
use crate::sparse::moe::{self as kernels, Matrix, MatrixStack};

const BF16: &str = "uint16 (a view of ml_dtypes.bfloat16)";

type U16Array2<'py> = Bound<'py, PyArray2<u16>>;
type U16Array3<'py> = Bound<'py, PyArray3<u16>>;
type F32Array1<'py> = Bound<'py, PyArray1<f32>>;
type F32Array3<'py> = Bound<'py, PyArray3<f32>>;

fn bf16_2d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray<'py, u16, Ix2>> {
    borrow(arg, BF16, obj)
}

fn bf16_3d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray<'py, u16, Ix3>> {
    borrow(arg, BF16, obj)
}

fn f32_1d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray<'py, f32, Ix1>> {
    borrow(arg, "float32", obj)
}

/// The bf16 elements of a borrowed `uint16` view.
fn bits<'a, D: numpy::ndarray::Dimension>(
    arg: &str,
    a: &'a PyReadonlyArray<'_, u16, D>,
) -> PyResult<&'a [bf16]> {
    Ok(data(arg, a)?.reinterpret_cast::<bf16>())
}

fn matrix<'a>(
    arg: &'static str,
    a: &'a PyReadonlyArray<'_, u16, Ix2>,
) -> PyResult<Matrix<'a, bf16>> {
    let s = a.shape();
    Ok(Matrix::new(arg, bits(arg, a)?, s[0], s[1])?)
}

fn stack<'a>(
    arg: &'static str,
    a: &'a PyReadonlyArray<'_, u16, Ix3>,
) -> PyResult<MatrixStack<'a, bf16>> {
    let s = a.shape();
    Ok(MatrixStack::new(arg, bits(arg, a)?, s[0], s[1], s[2])?)
}

fn u16_2d<'py>(
    py: Python<'py>,
    what: &str,
    v: Vec<bf16>,
    (rows, cols): (usize, usize),
) -> PyResult<U16Array2<'py>> {
    out2(py, what, v.reinterpret_into(), rows, cols)
}

fn f32_3d<'py>(
    py: Python<'py>,
    what: &str,
    v: Vec<f32>,
    shape: (usize, usize, usize),
) -> PyResult<F32Array3<'py>> {
    Ok(Array3::from_shape_vec(shape, v)
        .map_err(internal(what))?
        .into_pyarray(py))
}

fn u16_3d<'py>(
    py: Python<'py>,
    what: &str,
    v: Vec<bf16>,
    shape: (usize, usize, usize),
) -> PyResult<U16Array3<'py>> {
    Ok(Array3::from_shape_vec(shape, v.reinterpret_into())
        .map_err(internal(what))?
        .into_pyarray(py))
}

/// `a [m, k] · b [k, n]` (or `b [n, k]` transposed when `transpose_b`), bf16 in and out,
/// accumulated in f32.
#[pyfunction]
#[pyo3(signature = (a, b, transpose_b=false))]
pub fn bf16_matmul<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
    transpose_b: bool,
) -> PyResult<U16Array2<'py>> {
    let (a, b) = (bf16_2d("a", a)?, bf16_2d("b", b)?);
    let (sa, sb) = (a.shape(), b.shape());
    let (m, k) = (sa[0], sa[1]);
    let (kb, n) = if transpose_b {
        (sb[1], sb[0])
    } else {
        (sb[0], sb[1])
    };
    if kb != k {
        return Err(PyValueError::new_err(format!(
            "b: expected {} rows matching a's {k} columns, got shape {sb:?} (transpose_b={transpose_b})",
            if transpose_b { "[n, k] with k" } else { "[k, n] with k" }
        )));
    }
    let (ad, bd) = (bits("a", &a)?, bits("b", &b)?);
    let out = detached(py, "bf16_matmul", || {
        let mut out = vec![bf16::ZERO; m * n];
        matmul_bf16((m, n, k), ad, bd, transpose_b, &mut out);
        out
    })?;
    u16_2d(py, "bf16_matmul", out, (m, n))
}

/// bf16 grouped matmul; see `moecore.kernels.bf16.BF16MoE.grouped_matmul`.
#[pyfunction]
pub fn moe_grouped_matmul_bf16<'py>(
    py: Python<'py>,
    x_sorted: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
) -> PyResult<U16Array2<'py>> {
    let (x, c, w) = (
        bf16_2d("x_sorted", x_sorted)?,
        i32_1d("counts", counts)?,
        bf16_3d("w", w)?,
    );
    let (xm, cm, wm) = (
        matrix("x_sorted", &x)?,
        data("counts", &c)?,
        stack("w", &w)?,
    );
    let y = detached(py, "moe_grouped_matmul_bf16", || {
        kernels::grouped_matmul_bf16(xm, cm, wm)
    })??;
    u16_2d(py, "moe_grouped_matmul_bf16", y, (xm.rows(), w.shape()[2]))
}

/// Backward of the bf16 grouped matmul w.r.t. its input.
#[pyfunction]
pub fn moe_grouped_matmul_dx_bf16<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
) -> PyResult<U16Array2<'py>> {
    let (dy, c, w) = (
        bf16_2d("dy", dy)?,
        i32_1d("counts", counts)?,
        bf16_3d("w", w)?,
    );
    let (dym, cm, wm) = (matrix("dy", &dy)?, data("counts", &c)?, stack("w", &w)?);
    let dx = detached(py, "moe_grouped_matmul_dx_bf16", || {
        kernels::grouped_matmul_dx_bf16(dym, cm, wm)
    })??;
    u16_2d(
        py,
        "moe_grouped_matmul_dx_bf16",
        dx,
        (dym.rows(), w.shape()[1]),
    )
}

/// Backward of the bf16 grouped matmul w.r.t. the weights (float32).
#[pyfunction]
pub fn moe_grouped_matmul_dw_bf16<'py>(
    py: Python<'py>,
    x_sorted: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
) -> PyResult<F32Array3<'py>> {
    let (x, dy, c) = (
        bf16_2d("x_sorted", x_sorted)?,
        bf16_2d("dy", dy)?,
        i32_1d("counts", counts)?,
    );
    let (xm, dym, cm) = (
        matrix("x_sorted", &x)?,
        matrix("dy", &dy)?,
        data("counts", &c)?,
    );
    let dw = detached(py, "moe_grouped_matmul_dw_bf16", || {
        kernels::grouped_matmul_dw_bf16(xm, dym, cm)
    })??;
    f32_3d(
        py,
        "moe_grouped_matmul_dw_bf16",
        dw,
        (cm.len(), xm.cols(), dym.cols()),
    )
}

/// The bf16 GELU expert FFN → `(h, a, y)` as bf16 (`uint16` views).
#[pyfunction]
pub fn moe_gelu_ffn_bf16<'py>(
    py: Python<'py>,
    x_sorted: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    w1: &Bound<'py, PyAny>,
    w2: &Bound<'py, PyAny>,
) -> PyResult<(U16Array2<'py>, U16Array2<'py>, U16Array2<'py>)> {
    let (x, c) = (bf16_2d("x_sorted", x_sorted)?, i32_1d("counts", counts)?);
    let (w1, w2) = (bf16_3d("w1", w1)?, bf16_3d("w2", w2)?);
    let (xm, cm) = (matrix("x_sorted", &x)?, data("counts", &c)?);
    let (w1s, w2s) = (stack("w1", &w1)?, stack("w2", &w2)?);
    let out = detached(py, "moe_gelu_ffn_bf16", || {
        kernels::gelu_ffn_forward_bf16(xm, cm, w1s, w2s)
    })??;
    let (rows, hidden, d_out) = (xm.rows(), w1.shape()[2], w2.shape()[2]);
    let what = "moe_gelu_ffn_bf16";
    Ok((
        u16_2d(py, what, out.h, (rows, hidden))?,
        u16_2d(py, what, out.a, (rows, hidden))?,
        u16_2d(py, what, out.y, (rows, d_out))?,
    ))
}

/// Backward of the bf16 GELU expert FFN → `(d_x bf16, d_w1 f32, d_w2 f32)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // the forward's inputs, its two saved arrays and dy
pub fn moe_gelu_ffn_backward_bf16<'py>(
    py: Python<'py>,
    x_sorted: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    w1: &Bound<'py, PyAny>,
    w2: &Bound<'py, PyAny>,
    h: &Bound<'py, PyAny>,
    a: &Bound<'py, PyAny>,
    d_y: &Bound<'py, PyAny>,
) -> PyResult<(U16Array2<'py>, F32Array3<'py>, F32Array3<'py>)> {
    let (x, c) = (bf16_2d("x_sorted", x_sorted)?, i32_1d("counts", counts)?);
    let (w1, w2) = (bf16_3d("w1", w1)?, bf16_3d("w2", w2)?);
    let (h, a, d_y) = (bf16_2d("h", h)?, bf16_2d("a", a)?, bf16_2d("d_y", d_y)?);
    let (xm, cm) = (matrix("x_sorted", &x)?, data("counts", &c)?);
    let (w1s, w2s) = (stack("w1", &w1)?, stack("w2", &w2)?);
    let (hm, am, dym) = (matrix("h", &h)?, matrix("a", &a)?, matrix("d_y", &d_y)?);
    let g = detached(py, "moe_gelu_ffn_backward_bf16", || {
        kernels::gelu_ffn_backward_bf16(xm, cm, w1s, w2s, hm, am, dym)
    })??;
    let (s1, s2) = (w1.shape(), w2.shape());
    let what = "moe_gelu_ffn_backward_bf16";
    Ok((
        u16_2d(py, what, g.d_x, (xm.rows(), s1[1]))?,
        f32_3d(py, what, g.d_w1, (s1[0], s1[1], s1[2]))?,
        f32_3d(py, what, g.d_w2, (s2[0], s2[1], s2[2]))?,
    ))
}

fn optional_f32<'py>(
    arg: &str,
    obj: &Option<Bound<'py, PyAny>>,
) -> PyResult<Option<PyReadonlyArray<'py, f32, Ix1>>> {
    obj.as_ref().map(|o| f32_1d(arg, o)).transpose()
}

fn as_slice<'a>(a: &'a Option<PyReadonlyArray<'_, f32, Ix1>>) -> Option<&'a [f32]> {
    a.as_ref().and_then(|a| a.as_slice().ok())
}

/// LayerNorm/RMSNorm of bf16 rows `x [rows, cols]` → `(y bf16, mean f32, rstd f32)`;
/// `weight`, `bias` float32 or None.
#[pyfunction]
#[pyo3(signature = (x, weight, bias, eps, center))]
pub fn fused_norm_forward_bf16<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    weight: Option<Bound<'py, PyAny>>,
    bias: Option<Bound<'py, PyAny>>,
    eps: f32,
    center: bool,
) -> PyResult<(U16Array2<'py>, F32Array1<'py>, F32Array1<'py>)> {
    let x = bf16_2d("x", x)?;
    let (w, b) = (
        optional_f32("weight", &weight)?,
        optional_f32("bias", &bias)?,
    );
    let s = x.shape();
    let shape = NormShape {
        rows: s[0],
        cols: s[1],
        center,
        eps,
    };
    let xs = bits("x", &x)?;
    let (ws, bs) = (as_slice(&w), as_slice(&b));
    let (out, mean, rstd) = detached(py, "norm forward (bf16)", || {
        let mut out = vec![bf16::ZERO; xs.len()];
        let (mut mean, mut rstd) = (vec![0.0f32; shape.rows], vec![0.0f32; shape.rows]);
        norm_forward_bf16(shape, xs, ws, bs, &mut out, &mut mean, &mut rstd)
            .map(|()| (out, mean, rstd))
    })??;
    Ok((
        u16_2d(py, "norm forward (bf16)", out, (shape.rows, shape.cols))?,
        Array1::from_vec(mean).into_pyarray(py),
        Array1::from_vec(rstd).into_pyarray(py),
    ))
}

/// Backward of [`fused_norm_forward_bf16`] → `(dx bf16, dw f32 or None, db f32 or None)`.
#[pyfunction]
#[pyo3(signature = (g, x, mean, rstd, weight, eps, center, need_weight, need_bias))]
#[allow(clippy::too_many_arguments)]
pub fn fused_norm_backward_bf16<'py>(
    py: Python<'py>,
    g: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    mean: &Bound<'py, PyAny>,
    rstd: &Bound<'py, PyAny>,
    weight: Option<Bound<'py, PyAny>>,
    eps: f32,
    center: bool,
    need_weight: bool,
    need_bias: bool,
) -> PyResult<(
    U16Array2<'py>,
    Option<F32Array1<'py>>,
    Option<F32Array1<'py>>,
)> {
    let (g, x) = (bf16_2d("g", g)?, bf16_2d("x", x)?);
    let (mean, rstd) = (f32_1d("mean", mean)?, f32_1d("rstd", rstd)?);
    let w = optional_f32("weight", &weight)?;
    let s = x.shape();
    let shape = NormShape {
        rows: s[0],
        cols: s[1],
        center,
        eps,
    };
    let (gs, xs) = (bits("g", &g)?, bits("x", &x)?);
    let (ms, rs) = (data("mean", &mean)?, data("rstd", &rstd)?);
    let ws = as_slice(&w);
    let (dx, dw, db) = detached(py, "norm backward (bf16)", || {
        let mut dx = vec![bf16::ZERO; xs.len()];
        let mut dw = need_weight.then(|| vec![0.0f32; shape.cols]);
        let mut db = need_bias.then(|| vec![0.0f32; shape.cols]);
        let grads = NormGrads {
            dx: &mut dx,
            dw: dw.as_deref_mut(),
            db: db.as_deref_mut(),
        };
        norm_backward_bf16(shape, gs, xs, ms, rs, ws, grads).map(|()| (dx, dw, db))
    })??;
    Ok((
        u16_2d(py, "norm backward (bf16)", dx, (shape.rows, shape.cols))?,
        dw.map(|v| Array1::from_vec(v).into_pyarray(py)),
        db.map(|v| Array1::from_vec(v).into_pyarray(py)),
    ))
}

/// Attention forward from a bf16 `qkv [B, T, 3·H·D]` → `(out bf16 [B, T, H·D], probs f32
/// [B, H, T, T])`.
#[pyfunction]
pub fn fused_attention_forward_bf16<'py>(
    py: Python<'py>,
    qkv: &Bound<'py, PyAny>,
    heads: usize,
    causal: bool,
) -> PyResult<(U16Array3<'py>, Bound<'py, numpy::PyArray4<f32>>)> {
    let qkv = bf16_3d("qkv", qkv)?;
    let s = attention_shape(qkv.shape(), heads)?;
    let src = bits("qkv", &qkv)?;
    let (out, probs) = detached(py, "attention forward (bf16)", || {
        attention_forward_bf16(src, s, causal)
    })??;
    let what = "attention forward (bf16)";
    let probs = numpy::ndarray::Array4::from_shape_vec((s.batch, s.heads, s.seq, s.seq), probs)
        .map_err(internal(what))?;
    Ok((
        u16_3d(py, what, out, (s.batch, s.seq, s.heads * s.head_dim))?,
        probs.into_pyarray(py),
    ))
}

/// Attention backward for bf16 `qkv` and `d_out` (f32 `probs`) → bf16 `d_qkv`.
#[pyfunction]
pub fn fused_attention_backward_bf16<'py>(
    py: Python<'py>,
    qkv: &Bound<'py, PyAny>,
    probs: &Bound<'py, PyAny>,
    d_out: &Bound<'py, PyAny>,
    heads: usize,
    causal: bool,
) -> PyResult<U16Array3<'py>> {
    let (qkv, d_out) = (bf16_3d("qkv", qkv)?, bf16_3d("d_out", d_out)?);
    let probs = borrow::<f32, numpy::ndarray::Ix4>("probs", "float32", probs)?;
    let s = attention_shape(qkv.shape(), heads)?;
    let (src, p, g) = (
        bits("qkv", &qkv)?,
        data("probs", &probs)?,
        bits("d_out", &d_out)?,
    );
    let d_qkv = detached(py, "attention backward (bf16)", || {
        attention_backward_bf16(src, p, g, s, causal)
    })??;
    let shape = qkv.shape();
    u16_3d(
        py,
        "attention backward (bf16)",
        d_qkv,
        (shape[0], shape[1], shape[2]),
    )
}
