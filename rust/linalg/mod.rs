//! Dense linear algebra and fast math shared by the kernels (MoE, fused attention, GELU).

pub(crate) mod fastmath;
pub(crate) mod gemm;
pub(crate) mod simd;
