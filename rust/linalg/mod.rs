//! What the kernels (MoE, block-sparse, fused attention, GELU, norms) share: the one GEMM
//! doorway, fast math and SIMD dispatch, and their output buffers (fallible, unzeroed
//! allocation, and disjoint tiles that tasks write side by side).

pub(crate) mod bf16;
pub(crate) mod buffers;
pub(crate) mod fastmath;
pub(crate) mod gemm;
pub(crate) mod simd;
pub(crate) mod tiles;
