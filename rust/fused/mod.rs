//! Fused kernels of the dense ops: multi-head attention straight from the packed q/k/v
//! projection, GELU, and LayerNorm/RMSNorm with their backward — one pass over memory where
//! numpy needs many.

pub mod attention;
pub mod gelu;
pub mod norm;
