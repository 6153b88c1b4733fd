//! MoE kernels: routing, permute into expert-contiguous order, grouped matmul, unpermute.
//!
//! The semantics follow Megatron-Core / MegaBlocks (and DeepSeek-V3 for the biased and
//! group-limited routing):
//!
//! - [`route`]: softmax or sigmoid scores, top-k choice on `scores + bias` (ties to the lower
//!   expert index), weights from the unbiased scores, optionally renormalised over the k;
//!   [`route_backward`] is the gradient of those weights with respect to the logits.
//! - [`permute`]: the `T·k` assignments grouped by expert (expert 0 first, stable in the flat
//!   assignment index `t·k + j`), with optional capacity dropping and zero-row padding;
//!   `order[r]` names the assignment row `r` came from (`-1` for padding).
//! - [`unpermute`]: the weighted sum of each token's rows back into `[T, d]`, and its
//!   backward [`unpermute_backward`]; [`permute_backward`] is `unpermute` with unit weights.
//! - [`grouped_matmul`] and its backward forms [`grouped_matmul_dx`], [`grouped_matmul_dw`]:
//!   each expert's contiguous block of rows times that expert's weight matrix.
//! - [`gelu_ffn_forward`] / [`gelu_ffn_backward`]: the whole GELU expert FFN (two grouped
//!   matmuls and the GELU between them) as one tiled kernel each way.
//! - `*_bf16`: the grouped matmuls and the FFN for bf16 activations and weights (`half::bf16`),
//!   accumulated in f32 through the bf16 GEMM doorway (`linalg::bf16`); weight gradients f32.
//! - [`router_logits`] / [`router_backward`]: the router's products `x · wᵀ` and back.
//!
//! Every function validates its inputs (shapes, index ranges, consistency of `order` and
//! `counts`) before touching memory and reports a [`MoeError`] naming the argument, the
//! expected and the actual value. Work is split over rows on rayon's threads where that was
//! measured to pay (routing, grouped matmul; the memory-bound gathers only for large inputs,
//! see `par`), each thread owning its outputs: no atomics.

mod error;
mod ffn;
mod grouped;
mod matrix;
mod par;
mod permute;
#[cfg(test)]
mod proptests;
mod route;
mod router_matmul;
mod unpermute;

pub use error::MoeError;
pub use ffn::{
    gelu_ffn_backward, gelu_ffn_backward_bf16, gelu_ffn_forward, gelu_ffn_forward_bf16, FfnForward,
    FfnGrads,
};
pub use grouped::{
    grouped_matmul, grouped_matmul_bf16, grouped_matmul_dw, grouped_matmul_dw_bf16,
    grouped_matmul_dx, grouped_matmul_dx_bf16, MatrixStack,
};
pub use matrix::Matrix;
pub use permute::{permute, permute_order, PermuteOptions, Permuted};
pub use route::{route, route_backward, RouteOptions, Routing, Score};
pub use router_matmul::{router_backward, router_logits};
pub use unpermute::{permute_backward, unpermute, unpermute_backward, UnpermuteGrads};
