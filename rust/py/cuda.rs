//! The CUDA kernel sources (`cuda/*.cu`), embedded at build time so every wheel carries
//! exactly the sources it was tested with; `moecore.kernels.cuda` compiles them with CuPy.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// (family, source) for every file of `cuda/`; a new family is one more line here.
const SOURCES: &[(&str, &str)] = &[
    ("adamw", include_str!("../../cuda/adamw.cu")),
    ("bsr", include_str!("../../cuda/bsr.cu")),
    ("codec", include_str!("../../cuda/codec.cu")),
    ("fp8", include_str!("../../cuda/fp8.cu")),
    ("moe", include_str!("../../cuda/moe.cu")),
    ("topk", include_str!("../../cuda/topk.cu")),
];

/// `{family: source}` for every CUDA kernel family shipped in this build.
#[pyfunction]
pub fn cuda_sources(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (family, source) in SOURCES {
        d.set_item(family, source)?;
    }
    Ok(d)
}
