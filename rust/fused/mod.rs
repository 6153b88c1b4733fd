//! Fused kernels of the dense ops: multi-head attention straight from the packed q/k/v
//! projection, and GELU with its backward — one pass over memory where numpy needs many.

pub mod attention;
pub mod gelu;
