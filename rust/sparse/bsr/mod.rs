//! Block-sparse (BSR) matrices and their matmuls: forward `y = x·wᵀ (+ bias)`, input gradient
//! `dx = dy·w`, and the weight gradient at the kept blocks only (SDDMM).
//!
//! A [`BsrPattern`] is validated once (sorted, in range, no duplicates, shape divisible by the
//! block) and carries the transposed index the dX kernel needs. The kernels take the pattern
//! plus flat row-major slices and write every element of their output. They run on the rayon
//! pool; the block micro-kernels are hand-written with `std::arch` for AVX-512F and AVX2+FMA,
//! picked at run time, with a portable fallback ([`Isa`]).

mod error;
mod kernels;
mod linear;
mod pack;
mod pattern;
mod sddmm;

#[cfg(test)]
mod tests;

pub use error::{BsrError, Result};
pub use kernels::Isa;
pub use linear::{
    bsr_linear, bsr_linear_dx, bsr_linear_dx_vec, bsr_linear_dx_with, bsr_linear_vec,
    bsr_linear_with,
};
pub use pattern::{BsrPattern, SUPPORTED_BLOCKS};
pub use sddmm::{bsr_linear_dw, bsr_linear_dw_vec, bsr_linear_dw_with};
