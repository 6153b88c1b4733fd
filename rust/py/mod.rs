//! PyO3 bindings: one file per runtime module, thin, no algorithms.
//!
//! Every binding has the same shape: extract and check its arguments, release the GIL through
//! [`gil::detached`] (which also keeps panics from reaching Python), call the pure-Rust
//! function, and map the module's error enum to the exceptions defined in [`errors`].

mod bf16;
mod comm;
mod compress;
mod cuda;
mod errors;
mod fused;
mod fused_norm;
mod gil;
mod info;
mod kernel_memory;
mod moe;
mod optim;
mod pipeline;
mod pool;
mod pool_dtype;
mod pool_handler;
mod selftest;
mod sparse;

#[pyo3::pymodule]
mod _core {
    #[pymodule_export]
    use super::bf16::{
        bf16_matmul, fused_attention_backward_bf16, fused_attention_forward_bf16,
        fused_norm_backward_bf16, fused_norm_forward_bf16, moe_gelu_ffn_backward_bf16,
        moe_gelu_ffn_bf16, moe_grouped_matmul_bf16, moe_grouped_matmul_dw_bf16,
        moe_grouped_matmul_dx_bf16,
    };
    #[pymodule_export]
    use super::comm::{comm_simulate, PyScheduler};
    #[pymodule_export]
    use super::compress::{
        compress_decode, compress_decompress, compress_decompress_into, compress_decompress_sum,
        compress_encode, compress_header, compress_int8, compress_select, compress_topk,
        compress_topk_pieces,
    };
    #[pymodule_export]
    use super::cuda::cuda_sources;
    #[pymodule_export]
    use super::errors::{
        CorruptPayload, InternalError, NonFiniteGradient, PoolMisuse, PoolOutOfMemory,
        SchedulerMisuse,
    };
    #[pymodule_export]
    use super::fused::{
        fused_attention_backward, fused_attention_forward, fused_gelu, fused_gelu_backward,
    };
    #[pymodule_export]
    use super::fused_norm::{fused_norm_backward, fused_norm_forward};
    #[pymodule_export]
    use super::info::build_info;
    #[pymodule_export]
    use super::kernel_memory::{kernel_cache_info, kernel_cache_release, kernel_cache_set_limit};
    #[pymodule_export]
    use super::moe::{
        moe_gelu_ffn, moe_gelu_ffn_backward, moe_grouped_matmul, moe_grouped_matmul_dw,
        moe_grouped_matmul_dx, moe_permute, moe_permute_backward, moe_route, moe_route_backward,
        moe_router_backward, moe_router_logits, moe_unpermute, moe_unpermute_backward,
    };
    #[pymodule_export]
    use super::optim::adamw_step;
    #[pymodule_export]
    use super::pipeline::{pipeline_schedule, pipeline_simulate};
    #[pymodule_export]
    use super::pool::{pool_random_trace, pool_replay, PoolCore};
    #[pymodule_export]
    use super::selftest::_panic_for_tests;
    #[pymodule_export]
    use super::sparse::{bsr_kernel_isa, bsr_linear, bsr_linear_dw, bsr_linear_dx, PyBsrPattern};

    #[pymodule_init]
    fn init(_m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        super::info::check_cpu_level_from_env()?;
        super::kernel_memory::configure_from_env()
    }
}
