//! The extension's global allocator — large freed blocks kept for the next kernel call
//! (`crate::pool::large_block_cache`) — and its controls from Python.

use std::alloc::System;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::pool::large_block_cache::LargeBlockCache;

/// Requests of at least this many bytes go through the cache (smaller ones reuse glibc's
/// heap well already).
const MIN_BYTES: usize = 1 << 20;
/// Freed bytes kept at most, unless `MOECORE_KERNEL_CACHE_MB` says otherwise.
const DEFAULT_LIMIT: usize = 512 << 20;
/// The environment variable that sets the limit, in MiB (0 turns the cache off).
pub const LIMIT_VARIABLE: &str = "MOECORE_KERNEL_CACHE_MB";

#[global_allocator]
static ALLOCATOR: LargeBlockCache<System> = LargeBlockCache::new(System, MIN_BYTES, DEFAULT_LIMIT);

/// Applies `MOECORE_KERNEL_CACHE_MB` when the extension is imported; a value that is not a
/// whole number of MiB is refused with a `ValueError` naming the variable.
pub fn configure_from_env() -> PyResult<()> {
    let Ok(text) = std::env::var(LIMIT_VARIABLE) else {
        return Ok(());
    };
    let mib: usize = text.trim().parse().map_err(|_| {
        PyValueError::new_err(format!(
            "{LIMIT_VARIABLE}={text:?}: expected a whole number of MiB (0 turns the cache off)"
        ))
    })?;
    ALLOCATOR.set_limit(mib.saturating_mul(1 << 20));
    Ok(())
}

/// Bytes kept, blocks kept, the limit, the size threshold, hits and misses.
#[pyfunction]
pub fn kernel_cache_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let s = ALLOCATOR.stats();
    let d = PyDict::new(py);
    d.set_item("kept_bytes", s.kept_bytes)?;
    d.set_item("kept_blocks", s.kept_blocks)?;
    d.set_item("limit_bytes", s.limit_bytes)?;
    d.set_item("min_bytes", s.min_bytes)?;
    d.set_item("hits", s.hits)?;
    d.set_item("misses", s.misses)?;
    Ok(d)
}

/// Returns every kept block to the system.
#[pyfunction]
pub fn kernel_cache_release() {
    ALLOCATOR.release();
}

/// Sets the limit in bytes (0 turns the cache off), releasing what is over it.
#[pyfunction]
pub fn kernel_cache_set_limit(limit_bytes: usize) {
    ALLOCATOR.set_limit(limit_bytes);
}
