//! A picture of the pool: every segment and its blocks, as plain data.

use super::super::block::{BlockState, NIL};
use super::segment::SegmentKind;
use super::{Pool, SYNCED};

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

impl Pool {
    /// Every segment with its blocks, in address order.
    pub fn snapshot(&self) -> Vec<SegmentInfo> {
        self.segment_at
            .values()
            .map(|&s| {
                let seg = self.segment(s);
                let mut blocks = Vec::new();
                let mut b = seg.first;
                while b != NIL {
                    let blk = self.blocks.get(b);
                    let stream = if blk.slot == SYNCED {
                        None
                    } else {
                        Some(self.streams[blk.slot as usize].stream)
                    };
                    let state = if blk.cached {
                        BlockState::Free
                    } else {
                        blk.state
                    };
                    blocks.push(BlockInfo {
                        offset: blk.addr - seg.base,
                        size: blk.size,
                        requested: if state == BlockState::Allocated {
                            blk.requested
                        } else {
                            0
                        },
                        state,
                        stream,
                        cached: blk.cached,
                    });
                    b = blk.next_phys;
                }
                SegmentInfo {
                    address: seg.base,
                    size: seg.size,
                    kind: seg.kind,
                    blocks,
                }
            })
            .collect()
    }
}
