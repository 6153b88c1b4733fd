//! Running heavy work with the GIL released, with panics turned into a Python exception.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::prelude::*;

use super::errors::InternalError;

/// Runs `work` with the GIL released. A panic inside it (or inside a rayon task it spawned)
/// becomes `moecore.errors.InternalError` naming `what`, instead of PyO3's `PanicException`,
/// which escapes `except Exception`.
pub fn detached<T, F>(py: Python<'_>, what: &str, work: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    py.detach(|| catch_unwind(AssertUnwindSafe(work)))
        .map_err(|payload| InternalError::new_err(format!("{what}: {}", panic_message(&payload))))
}

/// Runs `work` with the GIL held, with the same panic guard as [`detached`]; for cheap calls
/// where releasing the GIL would cost more than the work.
pub fn guarded<T, F>(what: &str, work: F) -> PyResult<T>
where
    F: FnOnce() -> T,
{
    catch_unwind(AssertUnwindSafe(work))
        .map_err(|payload| InternalError::new_err(format!("{what}: {}", panic_message(&payload))))
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("internal error (please report): {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("internal error (please report): {s}")
    } else {
        "internal error (please report): a panic with no message".to_string()
    }
}
