//! PyO3 bindings: one file per runtime module, thin, no algorithms.
//!
//! Every binding has the same shape: extract and check its arguments, release the GIL through
//! [`gil::detached`] (which also keeps panics from reaching Python), call the pure-Rust
//! function, and map the module's error enum to the exceptions defined in [`errors`].

mod errors;
mod gil;
mod info;
mod pool;
mod pool_handler;

#[pyo3::pymodule]
mod _core {
    #[pymodule_export]
    use super::errors::{CorruptPayload, InternalError, PoolMisuse, PoolOutOfMemory};
    #[pymodule_export]
    use super::info::build_info;
    #[pymodule_export]
    use super::pool::{pool_random_trace, pool_replay, PoolCore};
}
