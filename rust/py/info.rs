//! Facts about this build of the extension, for `moecore info` and bug reports.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::cpu;

/// Reads `MOECORE_CPU_LEVEL` (at import) and refuses a value that names no level, as numpy
/// refuses a bad `NPY_DISABLE_CPU_FEATURES`: a typo must not silently run the native path.
pub fn check_cpu_level_from_env() -> PyResult<()> {
    cpu::requested_level()
        .map(|_| ())
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Where the kernel level in force came from, for `moecore info`.
fn cpu_level_source() -> String {
    match cpu::requested_level() {
        Ok(Some(cap)) if cap < cpu::native_level() => format!("forced by {}", cpu::LEVEL_ENV),
        Ok(Some(cap)) if cap > cpu::native_level() => format!(
            "{}={} asks for more than this CPU has",
            cpu::LEVEL_ENV,
            cap.name()
        ),
        Ok(Some(_)) => format!("{}, the CPU's widest", cpu::LEVEL_ENV),
        _ => "detected".to_owned(),
    }
}

/// Version, build profile, target, the SIMD features detected on this CPU and the kernel
/// level in force (`cpu_level`, `cpu_level_native`, `cpu_level_source`).
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
    d.set_item("cpu_features", cpu::simd_features())?;
    d.set_item("cpu_level", cpu::level().name())?;
    d.set_item("cpu_level_native", cpu::native_level().name())?;
    d.set_item("cpu_level_source", cpu_level_source())?;
    d.set_item("rayon_threads", rayon::current_num_threads())?;
    Ok(d)
}
