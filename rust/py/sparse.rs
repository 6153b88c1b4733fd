//! Bindings of the block-sparse kernels (`crate::sparse::bsr`): a validated, immutable
//! `BsrPattern` and the three products. Arrays come in as numpy float32 C-contiguous arrays
//! (checked here, each problem a `ValueError` naming the argument) and results go out as new
//! numpy arrays that take over the Rust buffer (no copy). The GIL is released while computing.

use numpy::ndarray::{Array2, Array3};
use numpy::prelude::*;
use numpy::{dtype, Element, PyArray, PyArray2, PyArray3, PyReadonlyArray, PyUntypedArray};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;

use super::gil::detached;
use crate::sparse::bsr::{self, BsrError, BsrPattern};

impl From<BsrError> for PyErr {
    fn from(err: BsrError) -> PyErr {
        match err {
            BsrError::OutOfMemory { .. } => PyMemoryError::new_err(err.to_string()),
            // Every other variant is bad input: a wrong pattern or a wrongly sized array.
            _ => PyValueError::new_err(err.to_string()),
        }
    }
}

/// A validated block-sparse pattern (what is stored, not the values). Immutable; holds the
/// transposed index the dX kernel needs, computed once.
#[pyclass(frozen, module = "moecore._core", name = "BsrPattern")]
pub struct PyBsrPattern {
    inner: BsrPattern,
}

#[pymethods]
impl PyBsrPattern {
    /// Validates `indptr`/`indices` (int64, 1-D) for a `shape` matrix of `block × block` blocks.
    #[new]
    fn new(
        shape: (usize, usize),
        block: usize,
        indptr: &Bound<'_, PyAny>,
        indices: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let indptr = readonly::<i64, numpy::Ix1>(indptr, "indptr")?;
        let indices = readonly::<i64, numpy::Ix1>(indices, "indices")?;
        let inner = BsrPattern::new(
            shape.0,
            shape.1,
            block,
            slice(&indptr, "indptr")?,
            slice(&indices, "indices")?,
        )?;
        Ok(Self { inner })
    }

    /// `(rows, cols)` of the dense matrix.
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.rows(), self.inner.cols())
    }

    /// The block edge B.
    #[getter]
    fn block(&self) -> usize {
        self.inner.block()
    }

    /// Number of stored blocks.
    #[getter]
    fn nnzb(&self) -> usize {
        self.inner.nnzb()
    }

    fn __repr__(&self) -> String {
        format!(
            "BsrPattern(shape=({}, {}), block={}, nnzb={})",
            self.inner.rows(),
            self.inner.cols(),
            self.inner.block(),
            self.inner.nnzb()
        )
    }
}

/// `y = x · wᵀ (+ bias)` with `w` given by `pattern` and `data` `[nnzb, B, B]`.
#[pyfunction]
#[pyo3(signature = (x, pattern, data, bias = None, out = None))]
pub fn bsr_linear<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    pattern: &Bound<'py, PyBsrPattern>,
    data: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let p = &pattern.get().inner;
    let x = readonly::<f32, numpy::Ix2>(x, "x")?;
    let n = expect_cols(x.shape(), "x", p.cols(), "in_features")?;
    let data = readonly::<f32, numpy::Ix3>(data, "data")?;
    expect_data_shape(data.shape(), p)?;
    let bias = bias
        .map(|b| readonly::<f32, numpy::Ix1>(b, "bias"))
        .transpose()?;
    if let Some(b) = &bias {
        if b.shape() != [p.rows()] {
            return Err(PyValueError::new_err(format!(
                "bias: expected shape ({},) (out_features), got {}",
                p.rows(),
                tuple(b.shape())
            )));
        }
    }
    let (xs, ds) = (slice(&x, "x")?, slice(&data, "data")?);
    let bs = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    if let Some(out) = out {
        return into_out(py, "bsr_linear", out, &[n, p.rows()], |y| {
            bsr::bsr_linear(xs, n, p, ds, bs, y)
        });
    }
    let y = detached(py, "bsr_linear", || bsr::bsr_linear_vec(xs, n, p, ds, bs))??;
    matrix(py, y, n, p.rows())
}

/// `dx = dy · w` with `w` given by `pattern` and `data` `[nnzb, B, B]`.
#[pyfunction]
#[pyo3(signature = (dy, pattern, data, out = None))]
pub fn bsr_linear_dx<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    pattern: &Bound<'py, PyBsrPattern>,
    data: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let p = &pattern.get().inner;
    let dy = readonly::<f32, numpy::Ix2>(dy, "dy")?;
    let n = expect_cols(dy.shape(), "dy", p.rows(), "out_features")?;
    let data = readonly::<f32, numpy::Ix3>(data, "data")?;
    expect_data_shape(data.shape(), p)?;
    let (dys, ds) = (slice(&dy, "dy")?, slice(&data, "data")?);
    if let Some(out) = out {
        return into_out(py, "bsr_linear_dx", out, &[n, p.cols()], |dx| {
            bsr::bsr_linear_dx(dys, n, p, ds, dx)
        });
    }
    let dx = detached(py, "bsr_linear_dx", || {
        bsr::bsr_linear_dx_vec(dys, n, p, ds)
    })??;
    matrix(py, dx, n, p.cols())
}

/// `dW` at the stored blocks of `pattern` only: `[nnzb, B, B]`, block `(i, j)` being
/// `dy[:, i-block]ᵀ · x[:, j-block]`.
#[pyfunction]
#[pyo3(signature = (dy, x, pattern, out = None))]
pub fn bsr_linear_dw<'py>(
    py: Python<'py>,
    dy: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    pattern: &Bound<'py, PyBsrPattern>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let p = &pattern.get().inner;
    let dy = readonly::<f32, numpy::Ix2>(dy, "dy")?;
    let n = expect_cols(dy.shape(), "dy", p.rows(), "out_features")?;
    let x = readonly::<f32, numpy::Ix2>(x, "x")?;
    let nx = expect_cols(x.shape(), "x", p.cols(), "in_features")?;
    if nx != n {
        return Err(PyValueError::new_err(format!(
            "x: expected {n} rows (as many as dy), got {nx}"
        )));
    }
    let (dys, xs) = (slice(&dy, "dy")?, slice(&x, "x")?);
    let b = p.block();
    if let Some(out) = out {
        return into_out(py, "bsr_linear_dw", out, &[p.nnzb(), b, b], |dw| {
            bsr::bsr_linear_dw(dys, xs, n, p, dw)
        });
    }
    let dw = detached(py, "bsr_linear_dw", || {
        bsr::bsr_linear_dw_vec(dys, xs, n, p)
    })??;
    let dw = Array3::from_shape_vec((p.nnzb(), b, b), dw)
        .map_err(|e| PyValueError::new_err(format!("dw: {e}")))?;
    Ok(dw.into_pyarray(py))
}

/// The instruction set the BSR micro-kernels use on this CPU: `"avx512"`, `"avx2"` or `"scalar"`.
#[pyfunction]
pub fn bsr_kernel_isa() -> &'static str {
    bsr::Isa::detect().name()
}

/// `obj` as a read-only numpy array of element `T` and `D` dimensions, C-contiguous, or a
/// `ValueError` saying which of those it is not.
fn readonly<'py, T: Element, D: numpy::ndarray::Dimension>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    typed::<T, D>(obj, name)?
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// Runs `product` (named `what`) with the GIL released into the `out` argument, checked to be
/// a writable float32 C-contiguous array of exactly `shape` that shares no memory with the
/// inputs (they are borrowed read-only first, so rust-numpy's borrow checker refuses an
/// overlapping `out`); returns `out`. Each problem is a `ValueError` naming `out`.
fn into_out<'py, D: numpy::ndarray::Dimension>(
    py: Python<'py>,
    what: &str,
    out: &Bound<'py, PyAny>,
    shape: &[usize],
    product: impl FnOnce(&mut [f32]) -> bsr::Result<()> + Send,
) -> PyResult<Bound<'py, PyArray<f32, D>>> {
    let array = typed::<f32, D>(out, "out")?;
    if array.shape() != shape {
        return Err(PyValueError::new_err(format!(
            "out: expected shape {}, got {}",
            tuple(shape),
            tuple(array.shape())
        )));
    }
    let mut rw = array.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "out: not writable, or shares memory with an input ({e})"
        ))
    })?;
    let values = rw
        .as_slice_mut()
        .map_err(|e| PyValueError::new_err(format!("out: {e}")))?;
    detached(py, what, || product(values))??;
    drop(rw);
    Ok(array)
}

/// `obj` as a numpy array of element `T` and `D` dimensions, C-contiguous, or a `ValueError`
/// saying which of those it is not.
fn typed<'py, T: Element, D: numpy::ndarray::Dimension>(
    obj: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<Bound<'py, PyArray<T, D>>> {
    let py = obj.py();
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyValueError::new_err(format!(
            "{name}: expected a numpy.ndarray, got {}",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".to_string(), |n| n.to_string())
        ))
    })?;
    let want = dtype::<T>(py);
    if !untyped.dtype().is_equiv_to(&want) {
        return Err(PyValueError::new_err(format!(
            "{name}: expected dtype {want}, got {}",
            untyped.dtype()
        )));
    }
    let ndim = D::NDIM.unwrap_or(untyped.ndim());
    if untyped.ndim() != ndim {
        return Err(PyValueError::new_err(format!(
            "{name}: expected a {ndim}-D array, got {}-D with shape {}",
            untyped.ndim(),
            tuple(untyped.shape())
        )));
    }
    if !untyped.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name}: expected a C-contiguous array, got strides {:?} (use numpy.ascontiguousarray)",
            obj.getattr("strides")?
        )));
    }
    untyped.cast::<PyArray<T, D>>().cloned().map_err(|_| {
        PyValueError::new_err(format!(
            "{name}: expected dtype {want} and {ndim} dimensions"
        ))
    })
}

fn slice<'a, T: Element, D: numpy::ndarray::Dimension>(
    array: &'a PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// The row count of a `[n, width]` array, or a `ValueError` if its width is not `width`.
fn expect_cols(shape: &[usize], name: &str, width: usize, what: &str) -> PyResult<usize> {
    if shape[1] != width {
        return Err(PyValueError::new_err(format!(
            "{name}: expected shape (N, {width}) ({what} = {width}), got {}",
            tuple(shape)
        )));
    }
    Ok(shape[0])
}

fn expect_data_shape(shape: &[usize], p: &BsrPattern) -> PyResult<()> {
    let want = [p.nnzb(), p.block(), p.block()];
    if shape != want {
        return Err(PyValueError::new_err(format!(
            "data: expected shape (nnzb, block, block) = {}, got {}",
            tuple(&want),
            tuple(shape)
        )));
    }
    Ok(())
}

fn matrix(
    py: Python<'_>,
    values: Vec<f32>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'_, PyArray2<f32>>> {
    let array = Array2::from_shape_vec((rows, cols), values)
        .map_err(|e| PyValueError::new_err(format!("output: {e}")))?;
    Ok(array.into_pyarray(py))
}

/// A shape written the way Python prints tuples: `(4, 16)`, `(4,)`, `()`.
fn tuple(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", parts.join(", "))
        }
    }
}
