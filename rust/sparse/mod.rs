//! CPU sparse kernels: block-sparse (BSR) matmul with its SDDMM backward, and the MoE
//! routing / permutation / grouped-matmul kernels.

pub mod bsr;
pub mod moe;
