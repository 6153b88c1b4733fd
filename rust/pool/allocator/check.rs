//! A consistency check of the internal structures, for tests.

use super::super::block::{BlockState, NIL};
use super::segment::SegmentKind;
use super::{FreeCounts, Pool};

impl Pool {
    /// Checks the internal structures against each other (links, lists, counters); panics
    /// with a description on the first inconsistency. The public-facing invariants (no
    /// overlap, merging, stats) are checked from the snapshot in `tests.rs`.
    pub(crate) fn check_internal(&self) {
        let mut allocated = 0usize;
        let mut cached = (0u64, 0u64);
        let mut counts = [FreeCounts::default(); 3];
        for (&base, &s) in &self.segment_at {
            let seg = self.segment(s);
            assert_eq!(seg.base, base);
            let mut b = seg.first;
            let mut at = seg.base;
            let mut prev = NIL;
            while b != NIL {
                let blk = self.blocks.get(b);
                assert_eq!(blk.addr, at, "blocks must tile the segment");
                assert_eq!(blk.prev_phys, prev);
                assert_eq!(blk.segment, s);
                match blk.state {
                    BlockState::Free => {
                        let list = &self.streams[blk.slot as usize].lists[seg.kind.index()];
                        assert!(
                            list.contains(self.blocks.as_slice(), b),
                            "free block unlisted"
                        );
                        let c = &mut counts[seg.kind.stat_pool() as usize];
                        c.free_bytes += blk.size as u64;
                        c.free_blocks += 1;
                    }
                    BlockState::Allocated if blk.cached => {
                        let cache = &self.streams[blk.slot as usize].cache;
                        assert!(cache.contains(self.blocks.as_slice(), b), "cached unlisted");
                        assert_eq!(seg.kind, SegmentKind::Small);
                        assert_eq!(self.live.get(&blk.addr), None);
                        let c = &mut counts[seg.kind.stat_pool() as usize];
                        c.free_bytes += blk.size as u64;
                        c.free_blocks += 1;
                        cached.0 += 1;
                        cached.1 += blk.size as u64;
                    }
                    BlockState::Allocated => {
                        assert_eq!(self.live.get(&blk.addr), Some(&b));
                        allocated += 1;
                    }
                    BlockState::Pending => assert!(self.pending.contains(&b)),
                }
                at += blk.size;
                prev = b;
                b = blk.next_phys;
            }
            assert_eq!(at, seg.base + seg.size, "blocks must cover the segment");
            let first = self.blocks.get(seg.first);
            let whole = first.state == BlockState::Free && first.size == seg.size;
            assert_eq!(whole, seg.wholly_free);
            if whole {
                let c = &mut counts[seg.kind.stat_pool() as usize];
                c.wholly_free_bytes += seg.size as u64;
                c.wholly_free_segments += 1;
            }
        }
        assert_eq!(allocated, self.live.len());
        assert_eq!(cached, (self.cached_blocks, self.cached_bytes));
        for p in [1, 2] {
            let (a, b) = (counts[p], self.counts[p]);
            assert_eq!(
                (
                    a.free_bytes,
                    a.free_blocks,
                    a.wholly_free_bytes,
                    a.wholly_free_segments
                ),
                (
                    b.free_bytes,
                    b.free_blocks,
                    b.wholly_free_bytes,
                    b.wholly_free_segments
                ),
                "free counters of pool {p}"
            );
        }
    }
}
