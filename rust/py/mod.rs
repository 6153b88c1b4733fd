//! PyO3 bindings: one file per runtime module, thin, no algorithms.
//!
//! Every binding has the same shape: extract and check its arguments, release the GIL through
//! [`gil::detached`] (which also keeps panics from reaching Python), call the pure-Rust
//! function, and map the module's error enum to the exceptions defined in [`errors`].

mod errors;
#[allow(dead_code)] // used by every binding module as they land
mod gil;
mod info;
mod sparse;

#[pyo3::pymodule]
mod _core {
    #[pymodule_export]
    use super::errors::{CorruptPayload, InternalError, PoolMisuse, PoolOutOfMemory};
    #[pymodule_export]
    use super::info::build_info;
    #[pymodule_export]
    use super::sparse::{bsr_kernel_isa, bsr_linear, bsr_linear_dw, bsr_linear_dx, PyBsrPattern};
}
