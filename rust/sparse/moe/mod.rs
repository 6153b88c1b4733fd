//! MoE kernels: routing, permute into expert-contiguous order, grouped matmul, unpermute.
