//! Bindings of the MoE kernels (`crate::sparse::moe`): each function checks dtype, number of
//! dimensions and C-contiguity of its arrays (a `ValueError` naming the argument otherwise),
//! borrows them without copying, runs the kernel with the GIL released and hands the result
//! back to numpy without copying (`into_pyarray`). Shape consistency and index ranges are
//! checked by the kernels themselves, whose `MoeError` becomes a `ValueError` here.

use numpy::ndarray::{Array1, Array2, Array3, Dimension, Ix1, Ix2, Ix3, ShapeBuilder};
use numpy::{
    Element, IntoPyArray, PyArray, PyArray1, PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;

use super::errors::InternalError;
use super::gil::detached;
use crate::sparse::moe::{
    self as kernels, Matrix, MatrixStack, MoeError, PermuteOptions, RouteOptions, Score,
};

impl From<MoeError> for PyErr {
    fn from(err: MoeError) -> PyErr {
        match err {
            MoeError::OutOfMemory { .. } => PyMemoryError::new_err(err.to_string()),
            MoeError::Shape { .. } | MoeError::Value { .. } | MoeError::Entry { .. } => {
                PyValueError::new_err(err.to_string())
            }
        }
    }
}

/// What `obj` is, for an error message: dtype and shape of an array, else its type.
pub(super) fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("an array of dtype {} and shape {:?}", a.dtype(), a.shape()),
        Err(_) => match obj.get_type().name() {
            Ok(name) => format!("an object of type {name}"),
            Err(_) => "an object of unknown type".to_string(),
        },
    }
}

/// `obj` borrowed read-only as a C-contiguous `D`-dimensional array of `T` (named `dtype`),
/// or a `ValueError` naming `arg`.
pub(super) fn borrow<'py, T: Element, D: Dimension>(
    arg: &str,
    dtype: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    let ndim = D::NDIM.unwrap_or(0);
    let array = obj.cast::<PyArray<T, D>>().map_err(|_| {
        PyValueError::new_err(format!(
            "{arg}: expected a {ndim}-D numpy array of {dtype}, got {}",
            describe(obj)
        ))
    })?;
    if !array.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{arg}: expected a C-contiguous array (use numpy.ascontiguousarray), got strides {:?}",
            array.strides()
        )));
    }
    array
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{arg}: cannot be borrowed: {e}")))
}

fn f32_2d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray<'py, f32, Ix2>> {
    borrow(arg, "float32", obj)
}

fn i32_2d<'py>(arg: &str, obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray<'py, i32, Ix2>> {
    borrow(arg, "int32", obj)
}

pub(super) fn i32_1d<'py>(
    arg: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray<'py, i32, Ix1>> {
    borrow(arg, "int32", obj)
}

/// The data of a borrowed C-contiguous array (checked by [`borrow`]).
pub(super) fn data<'a, T: Element, D: Dimension>(
    arg: &str,
    a: &'a PyReadonlyArray<'_, T, D>,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|e| PyValueError::new_err(format!("{arg}: {e}")))
}

/// A borrowed 2-D array as a kernel [`Matrix`].
pub(super) fn matrix<'a, T: Element>(
    arg: &'static str,
    a: &'a PyReadonlyArray<'_, T, Ix2>,
) -> PyResult<Matrix<'a, T>> {
    let shape = a.shape();
    Ok(Matrix::new(arg, data(arg, a)?, shape[0], shape[1])?)
}

/// A Python int that must be >= 0, as `usize`.
fn non_negative(arg: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| {
        PyValueError::new_err(format!("{arg}: expected a non-negative integer, got {v}"))
    })
}

pub(super) fn internal(what: &str) -> impl Fn(numpy::ndarray::ShapeError) -> PyErr + '_ {
    move |e| InternalError::new_err(format!("{what}: result shape: {e}"))
}

fn out1<'py, T: Element>(py: Python<'py>, v: Vec<T>) -> Bound<'py, PyArray1<T>> {
    Array1::from_vec(v).into_pyarray(py)
}

pub(super) fn out2<'py, T: Element>(
    py: Python<'py>,
    what: &str,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    Ok(
        Array2::from_shape_vec((rows, cols).into_shape_with_order(), v)
            .map_err(internal(what))?
            .into_pyarray(py),
    )
}

type F32Array2<'py> = Bound<'py, PyArray2<f32>>;
type I32Array2<'py> = Bound<'py, PyArray2<i32>>;
type I32Array1<'py> = Bound<'py, PyArray1<i32>>;

/// Top-k routing; see `moecore.moe_kernels.route`.
#[pyfunction]
#[pyo3(signature = (logits, k, score = "softmax", bias = None, n_groups = None, topk_groups = None, normalize = true))]
#[allow(clippy::too_many_arguments)]
pub fn moe_route<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    k: i64,
    score: &str,
    bias: Option<&Bound<'py, PyAny>>,
    n_groups: Option<i64>,
    topk_groups: Option<i64>,
    normalize: bool,
) -> PyResult<(I32Array2<'py>, F32Array2<'py>, F32Array2<'py>)> {
    let logits = f32_2d("logits", logits)?;
    let bias = bias
        .map(|b| borrow::<f32, Ix1>("bias", "float32", b))
        .transpose()?;
    let opts = RouteOptions {
        k: non_negative("k", k)?,
        score: score.parse::<Score>()?,
        n_groups: n_groups.map(|g| non_negative("n_groups", g)).transpose()?,
        topk_groups: topk_groups
            .map(|g| non_negative("topk_groups", g))
            .transpose()?,
        normalize,
    };
    let lm = matrix("logits", &logits)?;
    let bias_data = bias.as_ref().map(|b| data("bias", b)).transpose()?;
    let r = detached(py, "moe_route", || kernels::route(lm, bias_data, &opts))??;
    let (t, e) = (lm.rows(), lm.cols());
    Ok((
        out2(py, "moe_route", r.expert_idx, t, opts.k)?,
        out2(py, "moe_route", r.weights, t, opts.k)?,
        out2(py, "moe_route", r.probs, t, e)?,
    ))
}

/// Gradient of the routing weights w.r.t. the logits; see `moecore.moe_kernels.route_backward`.
#[pyfunction]
#[pyo3(signature = (d_weights, expert_idx, probs, score = "softmax", normalize = true))]
pub fn moe_route_backward<'py>(
    py: Python<'py>,
    d_weights: &Bound<'py, PyAny>,
    expert_idx: &Bound<'py, PyAny>,
    probs: &Bound<'py, PyAny>,
    score: &str,
    normalize: bool,
) -> PyResult<F32Array2<'py>> {
    let (g, idx, p) = (
        f32_2d("d_weights", d_weights)?,
        i32_2d("expert_idx", expert_idx)?,
        f32_2d("probs", probs)?,
    );
    let score = score.parse::<Score>()?;
    let (g, idx, p) = (
        matrix("d_weights", &g)?,
        matrix("expert_idx", &idx)?,
        matrix("probs", &p)?,
    );
    let d = detached(py, "moe_route_backward", || {
        kernels::route_backward(g, idx, p, score, normalize)
    })??;
    out2(py, "moe_route_backward", d, p.rows(), p.cols())
}

/// Expert-contiguous gather; see `moecore.moe_kernels.permute`.
#[pyfunction]
#[pyo3(signature = (x, expert_idx, n_experts, capacity = None, weights = None, pad_to = 1))]
pub fn moe_permute<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    expert_idx: &Bound<'py, PyAny>,
    n_experts: i64,
    capacity: Option<i64>,
    weights: Option<&Bound<'py, PyAny>>,
    pad_to: i64,
) -> PyResult<(F32Array2<'py>, I32Array1<'py>, I32Array1<'py>)> {
    let (x, idx) = (f32_2d("x", x)?, i32_2d("expert_idx", expert_idx)?);
    let weights = weights.map(|w| f32_2d("weights", w)).transpose()?;
    let opts = PermuteOptions {
        n_experts: non_negative("n_experts", n_experts)?,
        capacity: capacity.map(|c| non_negative("capacity", c)).transpose()?,
        weights: weights.as_ref().map(|w| matrix("weights", w)).transpose()?,
        pad_to: non_negative("pad_to", pad_to)?,
    };
    let (xm, im) = (matrix("x", &x)?, matrix("expert_idx", &idx)?);
    let p = detached(py, "moe_permute", || kernels::permute(xm, im, &opts))??;
    let rows = p.rows();
    Ok((
        out2(py, "moe_permute", p.x_sorted, rows, xm.cols())?,
        out1(py, p.order),
        out1(py, p.counts),
    ))
}

/// Weighted sum of each token's rows; see `moecore.moe_kernels.unpermute`.
#[pyfunction]
#[pyo3(signature = (y_sorted, order, weights, n_tokens, k))]
pub fn moe_unpermute<'py>(
    py: Python<'py>,
    y_sorted: &Bound<'py, PyAny>,
    order: &Bound<'py, PyAny>,
    weights: Option<&Bound<'py, PyAny>>,
    n_tokens: i64,
    k: i64,
) -> PyResult<F32Array2<'py>> {
    let (ys, order) = (f32_2d("y_sorted", y_sorted)?, i32_1d("order", order)?);
    let weights = weights.map(|w| f32_2d("weights", w)).transpose()?;
    let (t, k) = (non_negative("n_tokens", n_tokens)?, non_negative("k", k)?);
    let ym = matrix("y_sorted", &ys)?;
    let om = data("order", &order)?;
    let wm = weights.as_ref().map(|w| matrix("weights", w)).transpose()?;
    let y = detached(py, "moe_unpermute", || kernels::unpermute(ym, om, wm, t, k))??;
    out2(py, "moe_unpermute", y, t, ym.cols())
}

/// Backward of permute w.r.t. x; see `moecore.moe_kernels.permute_backward`.
#[pyfunction]
pub fn moe_permute_backward<'py>(
    py: Python<'py>,
    dx_sorted: &Bound<'py, PyAny>,
    order: &Bound<'py, PyAny>,
    n_tokens: i64,
    k: i64,
) -> PyResult<F32Array2<'py>> {
    let (dxs, order) = (f32_2d("dx_sorted", dx_sorted)?, i32_1d("order", order)?);
    let (t, k) = (non_negative("n_tokens", n_tokens)?, non_negative("k", k)?);
    let dm = matrix("dx_sorted", &dxs)?;
    let om = data("order", &order)?;
    let dx = detached(py, "moe_permute_backward", || {
        kernels::permute_backward(dm, om, t, k)
    })??;
    out2(py, "moe_permute_backward", dx, t, dm.cols())
}

/// Backward of unpermute; see `moecore.moe_kernels.unpermute_backward`.
#[pyfunction]
pub fn moe_unpermute_backward<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    y_sorted: &Bound<'py, PyAny>,
    order: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
) -> PyResult<(F32Array2<'py>, F32Array2<'py>)> {
    let (dy, ys) = (f32_2d("dy", dy)?, f32_2d("y_sorted", y_sorted)?);
    let (order, w) = (i32_1d("order", order)?, f32_2d("weights", weights)?);
    let (dym, ym, wm) = (
        matrix("dy", &dy)?,
        matrix("y_sorted", &ys)?,
        matrix("weights", &w)?,
    );
    let om = data("order", &order)?;
    let g = detached(py, "moe_unpermute_backward", || {
        kernels::unpermute_backward(dym, ym, om, wm)
    })??;
    Ok((
        out2(
            py,
            "moe_unpermute_backward",
            g.d_y_sorted,
            ym.rows(),
            ym.cols(),
        )?,
        out2(
            py,
            "moe_unpermute_backward",
            g.d_weights,
            wm.rows(),
            wm.cols(),
        )?,
    ))
}

/// `[E, d_in, d_out]` expert weights as a kernel [`MatrixStack`].
fn stack<'a>(arg: &'static str, a: &'a PyReadonlyArray<'_, f32, Ix3>) -> PyResult<MatrixStack<'a>> {
    let s = a.shape();
    Ok(MatrixStack::new(arg, data(arg, a)?, s[0], s[1], s[2])?)
}

/// Per-expert matmul; see `moecore.moe_kernels.grouped_matmul`.
#[pyfunction]
pub fn moe_grouped_matmul<'py>(
    py: Python<'py>,
    x_sorted: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
) -> PyResult<F32Array2<'py>> {
    let (x, c) = (f32_2d("x_sorted", x_sorted)?, i32_1d("counts", counts)?);
    let w = borrow::<f32, Ix3>("w", "float32", w)?;
    let (xm, cm, wm) = (
        matrix("x_sorted", &x)?,
        data("counts", &c)?,
        stack("w", &w)?,
    );
    let y = detached(py, "moe_grouped_matmul", || {
        kernels::grouped_matmul(xm, cm, wm)
    })??;
    out2(py, "moe_grouped_matmul", y, xm.rows(), w.shape()[2])
}

/// Backward of grouped_matmul w.r.t. its input; see `moecore.moe_kernels.grouped_matmul_dx`.
#[pyfunction]
pub fn moe_grouped_matmul_dx<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
) -> PyResult<F32Array2<'py>> {
    let (dy, c) = (f32_2d("dy", dy)?, i32_1d("counts", counts)?);
    let w = borrow::<f32, Ix3>("w", "float32", w)?;
    let (dym, cm, wm) = (matrix("dy", &dy)?, data("counts", &c)?, stack("w", &w)?);
    let dx = detached(py, "moe_grouped_matmul_dx", || {
        kernels::grouped_matmul_dx(dym, cm, wm)
    })??;
    out2(py, "moe_grouped_matmul_dx", dx, dym.rows(), w.shape()[1])
}

/// Backward of grouped_matmul w.r.t. the weights; see `moecore.moe_kernels.grouped_matmul_dw`.
#[pyfunction]
pub fn moe_grouped_matmul_dw<'py>(
    py: Python<'py>,
    x_sorted: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let (x, dy) = (f32_2d("x_sorted", x_sorted)?, f32_2d("dy", dy)?);
    let c = i32_1d("counts", counts)?;
    let (xm, dym, cm) = (
        matrix("x_sorted", &x)?,
        matrix("dy", &dy)?,
        data("counts", &c)?,
    );
    let dw = detached(py, "moe_grouped_matmul_dw", || {
        kernels::grouped_matmul_dw(xm, dym, cm)
    })??;
    let shape = (cm.len(), xm.cols(), dym.cols());
    Ok(Array3::from_shape_vec(shape, dw)
        .map_err(internal("moe_grouped_matmul_dw"))?
        .into_pyarray(py))
}

type F32Array3<'py> = Bound<'py, PyArray3<f32>>;

fn out3<'py>(
    py: Python<'py>,
    what: &str,
    v: Vec<f32>,
    shape: (usize, usize, usize),
) -> PyResult<F32Array3<'py>> {
    Ok(Array3::from_shape_vec(shape, v)
        .map_err(internal(what))?
        .into_pyarray(py))
}

/// The GELU expert FFN in one kernel; see `moecore.moe_kernels.gelu_ffn`.
#[pyfunction]
pub fn moe_gelu_ffn<'py>(
    py: Python<'py>,
    x_sorted: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    w1: &Bound<'py, PyAny>,
    w2: &Bound<'py, PyAny>,
) -> PyResult<(F32Array2<'py>, F32Array2<'py>, F32Array2<'py>)> {
    let (x, c) = (f32_2d("x_sorted", x_sorted)?, i32_1d("counts", counts)?);
    let w1 = borrow::<f32, Ix3>("w1", "float32", w1)?;
    let w2 = borrow::<f32, Ix3>("w2", "float32", w2)?;
    let (xm, cm) = (matrix("x_sorted", &x)?, data("counts", &c)?);
    let (w1s, w2s) = (stack("w1", &w1)?, stack("w2", &w2)?);
    let out = detached(py, "moe_gelu_ffn", || {
        kernels::gelu_ffn_forward(xm, cm, w1s, w2s)
    })??;
    let (rows, hidden, d_out) = (xm.rows(), w1.shape()[2], w2.shape()[2]);
    Ok((
        out2(py, "moe_gelu_ffn", out.h, rows, hidden)?,
        out2(py, "moe_gelu_ffn", out.a, rows, hidden)?,
        out2(py, "moe_gelu_ffn", out.y, rows, d_out)?,
    ))
}

/// Backward of the GELU expert FFN; see `moecore.moe_kernels.gelu_ffn_backward`.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // the forward's inputs, its two saved arrays and dy
pub fn moe_gelu_ffn_backward<'py>(
    py: Python<'py>,
    x_sorted: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    w1: &Bound<'py, PyAny>,
    w2: &Bound<'py, PyAny>,
    h: &Bound<'py, PyAny>,
    a: &Bound<'py, PyAny>,
    d_y: &Bound<'py, PyAny>,
) -> PyResult<(F32Array2<'py>, F32Array3<'py>, F32Array3<'py>)> {
    let (x, c) = (f32_2d("x_sorted", x_sorted)?, i32_1d("counts", counts)?);
    let w1 = borrow::<f32, Ix3>("w1", "float32", w1)?;
    let w2 = borrow::<f32, Ix3>("w2", "float32", w2)?;
    let (h, a, d_y) = (f32_2d("h", h)?, f32_2d("a", a)?, f32_2d("d_y", d_y)?);
    let (xm, cm) = (matrix("x_sorted", &x)?, data("counts", &c)?);
    let (w1s, w2s) = (stack("w1", &w1)?, stack("w2", &w2)?);
    let (hm, am, dym) = (matrix("h", &h)?, matrix("a", &a)?, matrix("d_y", &d_y)?);
    let g = detached(py, "moe_gelu_ffn_backward", || {
        kernels::gelu_ffn_backward(xm, cm, w1s, w2s, hm, am, dym)
    })??;
    let (s1, s2) = (w1.shape(), w2.shape());
    Ok((
        out2(py, "moe_gelu_ffn_backward", g.d_x, xm.rows(), s1[1])?,
        out3(py, "moe_gelu_ffn_backward", g.d_w1, (s1[0], s1[1], s1[2]))?,
        out3(py, "moe_gelu_ffn_backward", g.d_w2, (s2[0], s2[1], s2[2]))?,
    ))
}

/// Router logits `x · router_wᵀ`; see `moecore.moe_kernels.router_logits`.
#[pyfunction]
pub fn moe_router_logits<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    router_w: &Bound<'py, PyAny>,
) -> PyResult<F32Array2<'py>> {
    let (x, w) = (f32_2d("x", x)?, f32_2d("router_w", router_w)?);
    let (xm, wm) = (matrix("x", &x)?, matrix("router_w", &w)?);
    let logits = detached(py, "moe_router_logits", || kernels::router_logits(xm, wm))??;
    out2(py, "moe_router_logits", logits, xm.rows(), wm.rows())
}

/// Backward of the router logits, adding into `d_x` in place; see
/// `moecore.moe_kernels.router_backward`.
#[pyfunction]
pub fn moe_router_backward<'py>(
    py: Python<'py>,
    d_logits: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    router_w: &Bound<'py, PyAny>,
    d_x: &Bound<'py, PyAny>,
) -> PyResult<F32Array2<'py>> {
    let (g, x, w) = (
        f32_2d("d_logits", d_logits)?,
        f32_2d("x", x)?,
        f32_2d("router_w", router_w)?,
    );
    let (gm, xm, wm) = (
        matrix("d_logits", &g)?,
        matrix("x", &x)?,
        matrix("router_w", &w)?,
    );
    let target = d_x.cast::<PyArray2<f32>>().map_err(|_| {
        PyValueError::new_err(format!(
            "d_x: expected a 2-D numpy array of float32, got {}",
            describe(d_x)
        ))
    })?;
    if !target.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "d_x: expected a C-contiguous array (it is written in place)",
        ));
    }
    let mut target = target
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("d_x: cannot be written: {e}")))?;
    let dx = target
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(format!("d_x: {e}")))?;
    let d_w = detached(py, "moe_router_backward", || {
        kernels::router_backward(gm, xm, wm, dx)
    })??;
    out2(py, "moe_router_backward", d_w, wm.rows(), wm.cols())
}
