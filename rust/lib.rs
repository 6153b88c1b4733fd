//! moecore's Rust core: the runtime pieces that must be fast and safe.
//!
//! Each module below is pure Rust (no Python types) and is unit-tested and benchmarked on its
//! own; `py` (feature `python`) holds the thin PyO3 bindings.

pub mod comm;
pub mod compress;
pub mod cpu;
pub mod fused;
mod linalg;
pub mod optim;
pub mod pool;
pub mod sparse;

#[cfg(feature = "python")]
mod py;

#[cfg(test)]
mod module_cycles;
