//! A picture of the pool: every segment and its blocks, as plain data.

use super::allocator::SegmentKind;
use super::block::BlockState;

/// One block of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// Offset from the segment's address.
    pub offset: usize,
    /// Size in bytes (a multiple of 512).
    pub size: usize,
    /// The size the caller asked for, for allocated blocks; 0 otherwise.
    pub requested: usize,
    pub state: BlockState,
    /// The stream that allocated it (allocated/pending) or whose free lists hold it (free);
    /// `None` for a free block reusable by any stream (after `synchronize()`).
    pub stream: Option<u64>,
    /// A free block held in its stream's free cache: not merged with its free neighbours
    /// until the cache is flushed (see `Pool`).
    pub cached: bool,
}

/// One segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub address: usize,
    pub size: usize,
    pub kind: SegmentKind,
    /// In address order; they tile the segment exactly.
    pub blocks: Vec<BlockInfo>,
}

impl BlockState {
    /// "allocated", "free" or "pending".
    pub fn name(self) -> &'static str {
        match self {
            BlockState::Free => "free",
            BlockState::Allocated => "allocated",
            BlockState::Pending => "pending",
        }
    }
}

impl SegmentKind {
    /// "small", "large" or "arena".
    pub fn name(self) -> &'static str {
        match self {
            SegmentKind::Small => "small",
            SegmentKind::Large => "large",
            SegmentKind::Arena => "arena",
        }
    }
}
