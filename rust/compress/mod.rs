//! Top-k gradient compression: selection, error feedback, quantization and the wire codec.
//!
//! # Selection ([`select`])
//! The "magnitude key" of a float is its bit pattern with the sign cleared, read as an integer:
//! it orders finite values by `|x|` and puts every NaN and ±inf above every finite value, so one
//! integer comparison both selects and detects non-finite input. The k selected entries are the
//! first k in the order (|x| descending, index ascending) — ties go to the lower index.
//! - [`Method::Exact`]: a parallel 2048-bucket histogram of the keys' top bits finds the bucket
//!   holding the k-th largest, one parallel pass collects the candidates at or above it, and an
//!   introselect (`select_nth_unstable`) among them finishes: O(n), deterministic.
//! - [`Method::Sampled`]: Deep Gradient Compression's threshold estimate. A strided sample of
//!   ≥ max(n/100, 2n/k) entries (runs of 128 at a seeded offset) gives a threshold a little
//!   below the sample's top-k quantile; one pass collects everything at or above it; the
//!   threshold is corrected (×0.8 when fewer than k passed, ×1.3 when more than ⌈1.3k⌉ passed
//!   and `exact_k` is off) for at most 10 rounds, then the exact top-k among the candidates is
//!   taken. Whenever at least k candidates passed, that is the exact top-k (the k-th largest
//!   is above the threshold), so with `exact_k` the result equals [`Method::Exact`]'s; after 10
//!   failed rounds it falls back to [`Method::Exact`].
//!
//! Collecting is branch-free (`collect`: AVX-512 `vpcompressd` into a register, or an AVX2
//! permutation table, or a scalar unconditional store, picked at run time), into one list
//! per parallel task. Finishing: a histogram of the candidates' keys finds the bucket of the
//! k-th largest, only that bucket's packed (key, !index) ranks go through introselect, and
//! the kept entries go into the result: below 2¹⁵ candidates in one serial branch-free pass,
//! from there in parallel over the lists, filtered in place and copied to their offsets.
//!
//! Encoding sizes and writes the varint index section in the same pass, in parallel pieces,
//! into a reused per-thread scratch; it is then copied after the header, whose size fields
//! depend on it.
//!
//! # Error feedback and momentum correction ([`feedback`])
//! With a residual `r`, the pass that selects also accumulates: `r ← r + g` and the candidates
//! are collected from the new `r` in the same sweep; the sent entries then keep only what the
//! value encoding lost (`r[i] ← r[i] − decoded(r[i])`, zero for f32). With DGC momentum
//! correction the sweep is `u ← m·u + g; v ← v + u`, selection on `v`, and both `u` and `v`
//! keep only the encoding loss at the sent entries. The gradient is never written nor copied.
//! A non-finite gradient raises [`CompressError::NonFinite`] and leaves the state as it was:
//! error feedback checks each 1024-element sub-block of the gradient before adding it (in the
//! same pass, from L1) and, on NaN/±inf, stops and subtracts what it had added (`r + g − g`:
//! the old residual up to float32 rounding); momentum checks the whole gradient first.
//!
//! # Wire format ([`codec`])
//! All integers little-endian. A payload is:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `b"MoEC"` |
//! | 4 | format version (1) |
//! | 5 | index encoding: 0 varint, 1 bitmap, 2 raw u32, 3 dense (no indices, k = n) |
//! | 6 | value encoding: 0 f32, 1 f16, 2 bf16, 3 int8 with per-chunk f32 scales |
//! | 7 | reserved, 0 |
//! | 8..16 | n (u64, ≤ 2³² − 1): length of the dense gradient |
//! | 16..24 | k (u64, ≤ n): number of entries sent |
//! | 24..32 | index section length in bytes (u64) |
//! | 32..36 | int8 chunk length C (u32; 1..=2²⁴ for int8, 0 otherwise) |
//! | 36..40 | reserved, 0 |
//! | 40.. | index section, then (int8 only) ⌈k/C⌉ f32 scales, then the k values |
//! | last 4 | CRC32C (Castagnoli) of every byte before it |
//!
//! Indices are strictly increasing. Varint stores `d₀ = i₀` and `dⱼ = iⱼ − iⱼ₋₁ − 1` as
//! minimal LEB128; the bitmap has bit `i % 8` of byte `i / 8` set for each sent index, with
//! zero padding bits; int8 values are `q · scale` with `q ∈ [−127, 127]` and, per chunk of C
//! values, `scale = max|v| / 127`.
//!
//! **Size formula.** `len = 44 + I + V` where
//! `I = Σⱼ max(1, ⌈bits(dⱼ)/7⌉)` (varint), `⌈n/8⌉` (bitmap), `4k` (raw), `0` (dense), and
//! `V = 4k` (f32), `2k` (f16, bf16), `k + 4⌈k/C⌉` (int8). `auto` picks the smallest of
//! varint, bitmap and raw (in that order on ties), and dense when k = n.
//!
//! # Decoding ([`decode`])
//! Every field is checked before anything is written or allocated: magic, version, encodings,
//! reserved bytes, k ≤ n ≤ 2³² − 1, the exact total length implied by the header (checked
//! arithmetic, so a lying header is caught by comparing with the real length), the CRC, then
//! the contents (minimal varints, indices increasing and < n, bitmap popcount = k and zero
//! padding, finite values, finite non-negative scales, no int8 code −128, all-zero codes under
//! a zero scale). Every allocation is bounded by the payload length or by the caller's output.
//! A failure is [`CompressError::Corrupt`] with a message naming what is wrong.

pub mod codec;
mod collect;
pub mod decode;
pub mod dense;
pub mod feedback;
pub mod pieces;
pub mod quant;
mod rng;
mod scan;
pub mod select;

pub use codec::{encode, Encoding, Header, IndexFormat, Rounding, ValueFormat};
pub use decode::{decode, parse_header, Decoded};
pub use dense::{decompress_into, decompress_sum, decompress_sum_overwrite, Write};
pub use feedback::{compress_topk, compress_topk_pieces, Feedback};
pub use pieces::Pieces;
pub use quant::quantize_int8;
pub use select::{select_topk, Method};

/// Largest gradient length a payload can describe (indices are u32).
pub const MAX_N: usize = u32::MAX as usize;

/// Everything that can go wrong in this module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompressError {
    /// k outside `0..=n`, or n too large for u32 indices.
    #[error("k = {k} is out of range for a gradient of n = {n} elements (need k <= n <= {max})", max = MAX_N)]
    BadK { k: usize, n: usize },
    /// The input had NaN or ±inf (or the accumulated residual overflowed to ±inf).
    #[error("{what} has a non-finite value ({value}) at index {index}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },
    /// Two buffers that must have the same length do not.
    #[error("{what} has {got} elements, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    /// A bad parameter (message says which and why).
    #[error("{0}")]
    InvalidArgument(String),
    /// A payload failed validation (message says what is wrong).
    #[error("corrupt payload: {0}")]
    Corrupt(String),
}

/// Shorthand for building [`CompressError::Corrupt`].
pub(crate) fn corrupt(msg: impl Into<String>) -> CompressError {
    CompressError::Corrupt(msg.into())
}

#[cfg(test)]
mod fuzz_tests;
