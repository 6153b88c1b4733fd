//! Bindings of [`crate::compress`]: argument checks, the GIL released for the work, results
//! moved into numpy arrays. `moecore.compress` (Python) is the public face.

use numpy::{Element, IntoPyArray, PyArray1, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::{CorruptPayload, NonFiniteGradient};
use super::gil::detached;
use crate::compress::{
    self, CompressError, Encoding, Feedback, IndexFormat, Method, Rounding, ValueFormat, Write,
};

impl From<CompressError> for PyErr {
    fn from(e: CompressError) -> PyErr {
        match e {
            CompressError::Corrupt(_) => CorruptPayload::new_err(e.to_string()),
            CompressError::NonFinite { .. } => NonFiniteGradient::new_err(e.to_string()),
            CompressError::BadK { .. }
            | CompressError::LengthMismatch { .. }
            | CompressError::InvalidArgument(_) => PyValueError::new_err(e.to_string()),
        }
    }
}

fn slice<'a, T: Element>(a: &'a PyReadonlyArray1<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{what} must be a C-contiguous, aligned array")))
}

fn slice_mut<'a, T: Element>(
    a: &'a mut PyReadwriteArray1<'_, T>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("{what} must be a C-contiguous, aligned array")))
}

fn method(name: &str, seed: u64, exact_k: bool) -> PyResult<Method> {
    match name {
        "exact" => Ok(Method::Exact),
        "sampled" => Ok(Method::Sampled { seed, exact_k }),
        other => Err(PyValueError::new_err(format!(
            "method must be 'exact' or 'sampled', got {other:?}"
        ))),
    }
}

fn encoding(index: &str, values: &str, chunk: u32) -> PyResult<Encoding> {
    let index = match index {
        "auto" => None,
        name => Some(IndexFormat::from_name(name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "index must be 'auto', 'varint', 'bitmap', 'raw' or 'dense', got {name:?}"
            ))
        })?),
    };
    let values = ValueFormat::from_name(values).ok_or_else(|| {
        PyValueError::new_err(format!(
            "values must be 'f32', 'f16', 'bf16' or 'int8', got {values:?}"
        ))
    })?;
    let e = Encoding {
        index,
        values,
        chunk,
    };
    e.validate()?;
    Ok(e)
}

/// Indices (increasing, uint32) of the k largest-magnitude entries of `grad`.
#[pyfunction]
#[pyo3(signature = (grad, k, *, method="sampled", seed=0, exact_k=true))]
pub fn compress_select<'py>(
    py: Python<'py>,
    grad: PyReadonlyArray1<'py, f32>,
    k: usize,
    method: &str,
    seed: u64,
    exact_k: bool,
) -> PyResult<Bound<'py, PyArray1<u32>>> {
    let m = self::method(method, seed, exact_k)?;
    let g = slice(&grad, "grad")?;
    let ix = detached(py, "compress_select", || compress::select_topk(g, k, m))??;
    Ok(ix.into_pyarray(py))
}

/// One top-k compression step; updates the error-feedback state in place.
#[pyfunction]
#[pyo3(signature = (
    grad, k, *, method="sampled", seed=0, exact_k=true, index="auto", values="f32", chunk=256,
    residual=None, velocity=None, accumulator=None, momentum=0.0
))]
#[allow(clippy::too_many_arguments)] // keyword-only arguments of one Python call
pub fn compress_topk<'py>(
    py: Python<'py>,
    grad: PyReadonlyArray1<'py, f32>,
    k: usize,
    method: &str,
    seed: u64,
    exact_k: bool,
    index: &str,
    values: &str,
    chunk: u32,
    mut residual: Option<PyReadwriteArray1<'py, f32>>,
    mut velocity: Option<PyReadwriteArray1<'py, f32>>,
    mut accumulator: Option<PyReadwriteArray1<'py, f32>>,
    momentum: f32,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let m = self::method(method, seed, exact_k)?;
    let e = encoding(index, values, chunk)?;
    let g = slice(&grad, "grad")?;
    let feedback = match (&mut residual, &mut velocity, &mut accumulator) {
        (None, None, None) => Feedback::None,
        (Some(r), None, None) => Feedback::Residual(slice_mut(r, "residual")?),
        (None, Some(u), Some(v)) => Feedback::Momentum {
            u: slice_mut(u, "velocity")?,
            v: slice_mut(v, "accumulator")?,
            m: momentum,
        },
        _ => {
            return Err(PyValueError::new_err(
                "give either residual, or velocity and accumulator together, or neither",
            ))
        }
    };
    let payload = detached(py, "compress_topk", || {
        compress::compress_topk(g, feedback, k, m, &e)
    })??;
    Ok(payload.into_pyarray(py))
}

/// Top-k with error feedback of the concatenation of `pieces`, read in place (see
/// `compress::compress_topk_pieces`); `residual` has the total length.
#[pyfunction]
#[pyo3(signature = (
    pieces, k, residual, *, method="sampled", seed=0, exact_k=true, index="auto", values="f32",
    chunk=256
))]
#[allow(clippy::too_many_arguments)] // keyword-only arguments of one Python call
pub fn compress_topk_pieces<'py>(
    py: Python<'py>,
    pieces: Vec<PyReadonlyArray1<'py, f32>>,
    k: usize,
    mut residual: PyReadwriteArray1<'py, f32>,
    method: &str,
    seed: u64,
    exact_k: bool,
    index: &str,
    values: &str,
    chunk: u32,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let m = self::method(method, seed, exact_k)?;
    let e = encoding(index, values, chunk)?;
    let parts = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| slice(p, &format!("pieces[{i}]")))
        .collect::<PyResult<Vec<&[f32]>>>()?;
    let r = slice_mut(&mut residual, "residual")?;
    let payload = detached(py, "compress_topk_pieces", || {
        compress::compress_topk_pieces(&parts, r, k, m, &e)
    })??;
    Ok(payload.into_pyarray(py))
}

/// Dense int8 quantization of all of `grad`, one scale per `chunk` elements.
#[pyfunction]
#[pyo3(signature = (grad, *, chunk=256, stochastic=false, seed=0))]
pub fn compress_int8<'py>(
    py: Python<'py>,
    grad: PyReadonlyArray1<'py, f32>,
    chunk: u32,
    stochastic: bool,
    seed: u64,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let g = slice(&grad, "grad")?;
    let rounding = if stochastic {
        Rounding::Stochastic { seed }
    } else {
        Rounding::Nearest
    };
    let payload = detached(py, "compress_int8", || {
        compress::quantize_int8(g, chunk, rounding)
    })??;
    Ok(payload.into_pyarray(py))
}

/// Encodes given (indices, values) of a length-n vector: the codec alone.
#[pyfunction]
#[pyo3(signature = (n, indices, values, *, index="auto", value_format="f32", chunk=256))]
pub fn compress_encode<'py>(
    py: Python<'py>,
    n: usize,
    indices: PyReadonlyArray1<'py, u32>,
    values: PyReadonlyArray1<'py, f32>,
    index: &str,
    value_format: &str,
    chunk: u32,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let e = encoding(index, value_format, chunk)?;
    let (ix, vals) = (slice(&indices, "indices")?, slice(&values, "values")?);
    let payload = detached(py, "compress_encode", || {
        compress::encode(n, ix, vals, &e, Rounding::Nearest, None)
    })??;
    Ok(payload.into_pyarray(py))
}

/// Validates and decodes a payload to (indices, values, n).
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn compress_decode<'py>(
    py: Python<'py>,
    payload: PyReadonlyArray1<'py, u8>,
) -> PyResult<(Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<f32>>, usize)> {
    let bytes = slice(&payload, "payload")?;
    let (ix, vals, n) = detached(py, "compress_decode", || {
        compress::decode(bytes).map(|d| {
            let (ix, vals) = d.to_sparse();
            (ix, vals, d.n())
        })
    })??;
    Ok((ix.into_pyarray(py), vals.into_pyarray(py), n))
}

/// The payload's header fields, after checking the header and the total length (not the
/// checksum nor the contents: `compress_decode` does those).
#[pyfunction]
pub fn compress_header<'py>(
    py: Python<'py>,
    payload: PyReadonlyArray1<'py, u8>,
) -> PyResult<Bound<'py, PyDict>> {
    let bytes = slice(&payload, "payload")?;
    let h = compress::parse_header(bytes)?;
    let d = PyDict::new(py);
    d.set_item("version", compress::codec::VERSION)?;
    d.set_item("index", h.index.name())?;
    d.set_item("values", h.values.name())?;
    d.set_item("n", h.n)?;
    d.set_item("k", h.k)?;
    d.set_item("index_bytes", h.index_bytes)?;
    d.set_item("chunk", h.chunk)?;
    d.set_item("nbytes", bytes.len())?;
    Ok(d)
}

/// Decodes a payload into a new dense array of `n` elements (which the payload must match).
#[pyfunction]
pub fn compress_decompress<'py>(
    py: Python<'py>,
    payload: PyReadonlyArray1<'py, u8>,
    n: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let bytes = slice(&payload, "payload")?;
    let h = compress::parse_header(bytes)?;
    if h.n != n as u64 {
        return Err(CompressError::Corrupt(format!(
            "payload is for n = {} elements, expected {n}",
            h.n
        ))
        .into());
    }
    let out = detached(py, "compress_decompress", || {
        let mut out = vec![0f32; n];
        compress::decompress_into(bytes, &mut out, Write::Overwrite).map(|()| out)
    })??;
    Ok(out.into_pyarray(py))
}

/// `out = dense(payload)` (add=False) or `out += scale · dense(payload)` (add=True).
#[pyfunction]
#[pyo3(signature = (payload, out, *, add, scale=1.0))]
pub fn compress_decompress_into<'py>(
    py: Python<'py>,
    payload: PyReadonlyArray1<'py, u8>,
    mut out: PyReadwriteArray1<'py, f32>,
    add: bool,
    scale: f32,
) -> PyResult<()> {
    let bytes = slice(&payload, "payload")?;
    let dst = slice_mut(&mut out, "out")?;
    let how = if add {
        Write::Add(scale)
    } else {
        Write::Overwrite
    };
    detached(py, "compress_decompress_into", || {
        compress::decompress_into(bytes, dst, how)
    })??;
    Ok(())
}

/// `out += scale · Σ dense(payloadᵢ)` (or `out = …` with `overwrite`), every payload
/// validated before `out` is written.
#[pyfunction]
#[pyo3(signature = (payloads, out, *, scale=1.0, overwrite=false))]
pub fn compress_decompress_sum<'py>(
    py: Python<'py>,
    payloads: Vec<PyReadonlyArray1<'py, u8>>,
    mut out: PyReadwriteArray1<'py, f32>,
    scale: f32,
    overwrite: bool,
) -> PyResult<()> {
    let views = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| slice(p, &format!("payloads[{i}]")))
        .collect::<PyResult<Vec<&[u8]>>>()?;
    let dst = slice_mut(&mut out, "out")?;
    detached(py, "compress_decompress_sum", || {
        if overwrite {
            compress::decompress_sum_overwrite(&views, dst, scale)
        } else {
            compress::decompress_sum(&views, dst, scale)
        }
    })??;
    Ok(())
}
