//! PyO3 bindings: one file per runtime module, thin, no algorithms.
//!
//! Every binding has the same shape: extract and check its arguments, release the GIL through
//! [`gil::detached`] (which also keeps panics from reaching Python), call the pure-Rust
//! function, and map the module's error enum to the exceptions defined in [`errors`].

mod compress;
mod errors;
#[allow(dead_code)] // used by every binding module as they land
mod gil;
mod info;

#[pyo3::pymodule]
mod _core {
    #[pymodule_export]
    use super::compress::{
        compress_decode, compress_decompress, compress_decompress_into, compress_decompress_sum,
        compress_encode, compress_header, compress_int8, compress_select, compress_topk,
    };
    #[pymodule_export]
    use super::errors::{CorruptPayload, InternalError, PoolMisuse, PoolOutOfMemory};
    #[pymodule_export]
    use super::info::build_info;
}
