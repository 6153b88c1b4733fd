//! Facts about this build of the extension, for `moecore info` and bug reports.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Version, build profile, target and the SIMD features detected on this CPU.
#[pyfunction]
pub fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    d.set_item("profile", profile)?;
    d.set_item("target_arch", std::env::consts::ARCH)?;
    d.set_item("target_os", std::env::consts::OS)?;
    d.set_item("cpu_features", crate::cpu::simd_features())?;
    d.set_item("rayon_threads", rayon::current_num_threads())?;
    Ok(d)
}
