//! Fused optimizer updates over many parameter tensors in one call.

pub mod adamw;
