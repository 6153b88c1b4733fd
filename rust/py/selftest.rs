//! A deliberate panic, for the tests: a built extension must turn a Rust panic into
//! `moecore.errors.InternalError`, not abort the interpreter. That depends on how the
//! extension was linked (the release wheel carries zig's unwinder instead of libgcc_s), so
//! the tests check it on the very build they run against.

use pyo3::prelude::*;

use super::gil;

/// Panics with `message`: on the calling thread with the GIL held, or (`in_worker`) inside a
/// rayon task with the GIL released. Never returns `Ok`.
#[pyfunction]
#[pyo3(signature = (message, in_worker = false))]
pub fn _panic_for_tests(py: Python<'_>, message: &str, in_worker: bool) -> PyResult<()> {
    if in_worker {
        gil::detached(py, "panic test", || {
            rayon::join(|| (), || fail(message));
        })
    } else {
        gil::guarded("panic test", || fail(message))
    }
}

fn fail(message: &str) {
    panic!("{message}");
}
