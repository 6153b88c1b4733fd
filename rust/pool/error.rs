//! The pool's one error enum.

use thiserror::Error;

/// Everything that can go wrong in the pool. The Python bindings map misuse variants to
/// `moecore.errors.PoolMisuse` (a `ValueError`), running out of memory to
/// `moecore.errors.PoolOutOfMemory` (a `MemoryError`) and bad traces to `ValueError`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PoolError {
    #[error("size must be positive, got 0 bytes")]
    ZeroSize,
    #[error("size {requested} bytes is too large to allocate")]
    SizeOverflow { requested: usize },
    #[error("alignment must be a power of two, got {alignment}")]
    AlignmentNotPowerOfTwo { alignment: usize },
    #[error("alignment {alignment} exceeds the pool's block alignment {max}")]
    AlignmentTooLarge { alignment: usize, max: usize },
    #[error("stream id {stream} is reserved by the pool; use another id")]
    ReservedStream { stream: u64 },
    #[error(
        "out of memory: requested {requested} bytes with {allocated} bytes allocated and \
         {reserved} bytes reserved, limit {limit} bytes"
    )]
    LimitExceeded {
        requested: usize,
        allocated: u64,
        reserved: u64,
        limit: u64,
    },
    #[error(
        "out of memory: the {backing} backing could not supply a {segment}-byte segment for a \
         request of {requested} bytes ({allocated} bytes allocated, {reserved} bytes reserved)"
    )]
    BackingExhausted {
        backing: &'static str,
        segment: usize,
        requested: usize,
        allocated: u64,
        reserved: u64,
    },
    #[error("address {address:#x} was not allocated by this pool")]
    ForeignAddress { address: usize },
    #[error("address {address:#x} is inside a block of this pool but not its start")]
    NotBlockStart { address: usize },
    #[error("double free: the block at {address:#x} is already free")]
    DoubleFree { address: usize },
    #[error(
        "the block at {address:#x} belongs to a numpy array; it returns to the pool when the \
         array and all its views are gone"
    )]
    OwnedByArray { address: usize },
    #[error("arena [{base:#x}, +{size}) is too small: fewer than 512 usable aligned bytes")]
    ArenaTooSmall { base: usize, size: usize },
    #[error("arena [{base:#x}, +{size}) overlaps memory this pool already manages")]
    ArenaOverlap { base: usize, size: usize },
    #[error("no arena was registered at {base:#x}")]
    UnknownArena { base: usize },
    #[error("arena at {base:#x} still has {live} live block(s)")]
    ArenaInUse { base: usize, live: usize },
    #[error("bad trace: event {index} frees id {id}, which is not live")]
    TraceUnknownId { index: usize, id: u64 },
    #[error("bad trace: event {index} allocates id {id}, which is already live")]
    TraceDuplicateId { index: usize, id: u64 },
    #[error("trace event {index} failed: {source}")]
    TraceEventFailed {
        index: usize,
        #[source]
        source: Box<PoolError>,
    },
}
