//! What can be wrong with a block-sparse matrix or with the arrays handed to its kernels.

use thiserror::Error;

/// Every way a BSR pattern, its data or a kernel argument can be invalid. Each message names
/// the rule that failed and the values involved.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BsrError {
    /// The block size is not one the kernels support.
    #[error("block must be one of 8, 16, 32 or 64, got {block}")]
    UnsupportedBlock { block: usize },

    /// A dimension of the dense shape is not a multiple of the block size.
    #[error("shape: {dim} = {size} is not a multiple of block = {block}")]
    ShapeNotDivisible {
        dim: &'static str,
        size: usize,
        block: usize,
    },

    /// `indptr` must have one entry per block-row plus one.
    #[error("indptr: expected length {expected} (block-rows + 1), got {actual}")]
    IndptrLength { expected: usize, actual: usize },

    /// `indptr[0]` must be 0.
    #[error("indptr: indptr[0] must be 0, got {actual}")]
    IndptrStart { actual: i64 },

    /// `indptr` must never decrease.
    #[error("indptr: must be non-decreasing, but indptr[{row}] = {start} > indptr[{next}] = {end}", next = row + 1)]
    IndptrDecreasing { row: usize, start: i64, end: i64 },

    /// `indptr[-1]` must equal the number of stored blocks.
    #[error("indptr: indptr[-1] = {actual} must equal len(indices) = {expected}")]
    IndptrEnd { expected: usize, actual: i64 },

    /// A block-column index lies outside `[0, cols / block)`.
    #[error("indices: block-column index {index} at position {position} (block-row {row}) is out of range [0, {limit})")]
    IndexOutOfRange {
        row: usize,
        position: usize,
        index: i64,
        limit: usize,
    },

    /// Block-column indices within a block-row must be strictly increasing.
    #[error("indices: not sorted within block-row {row}: indices[{position}] = {index} follows {previous}")]
    IndicesUnsorted {
        row: usize,
        position: usize,
        previous: i64,
        index: i64,
    },

    /// The same block appears twice in one block-row.
    #[error(
        "indices: duplicate block (block-row {row}, block-column {index}) at position {position}"
    )]
    DuplicateBlock {
        row: usize,
        position: usize,
        index: i64,
    },

    /// A pattern too large for the 32-bit block indices the kernels use.
    #[error("pattern too large: {what} = {value} exceeds {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: usize,
    },

    /// An array handed to a kernel does not have the size the pattern implies.
    #[error("{arg}: expected {expected} elements ({shape}), got {actual}")]
    Length {
        arg: &'static str,
        shape: String,
        expected: usize,
        actual: usize,
    },

    /// An output would not fit in memory (e.g. an enormous number of rows).
    #[error("{what}: cannot allocate {bytes} bytes for the result")]
    OutOfMemory { what: &'static str, bytes: usize },
}

impl From<crate::linalg::buffers::OutOfMemory> for BsrError {
    fn from(err: crate::linalg::buffers::OutOfMemory) -> Self {
        BsrError::OutOfMemory {
            what: err.what,
            bytes: err.bytes,
        }
    }
}

/// The crate-wide result type of this module.
pub type Result<T> = std::result::Result<T, BsrError>;
