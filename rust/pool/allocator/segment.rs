//! What a segment is: how it was obtained (its kind) and where its blocks start.

use super::super::stats::StatPool;

/// How a segment was obtained, which decides which requests it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// A 2 MiB segment from the backing for small requests.
    Small,
    /// A segment from the backing for one large request, later reused by large requests.
    Large,
    /// A region registered by the caller; never given back to the backing.
    Arena,
}

impl SegmentKind {
    #[inline]
    pub(super) fn index(self) -> usize {
        match self {
            SegmentKind::Small => 0,
            SegmentKind::Large => 1,
            SegmentKind::Arena => 2,
        }
    }

    #[inline]
    pub(super) fn from_index(i: u8) -> Self {
        match i {
            0 => SegmentKind::Small,
            1 => SegmentKind::Large,
            _ => SegmentKind::Arena,
        }
    }

    pub(super) fn stat_pool(self) -> StatPool {
        match self {
            SegmentKind::Small => StatPool::Small,
            SegmentKind::Large | SegmentKind::Arena => StatPool::Large,
        }
    }

    /// "small", "large" or "arena".
    pub fn name(self) -> &'static str {
        match self {
            SegmentKind::Small => "small",
            SegmentKind::Large => "large",
            SegmentKind::Arena => "arena",
        }
    }
}

#[derive(Debug)]
pub(super) struct Segment {
    pub(super) base: usize,
    pub(super) size: usize,
    pub(super) kind: SegmentKind,
    /// For arenas, what the caller registered (before alignment to 512 B).
    pub(super) registered: (usize, usize),
    pub(super) first: u32,
    /// The segment is one free block (counted in `FreeCounts`).
    pub(super) wholly_free: bool,
}
