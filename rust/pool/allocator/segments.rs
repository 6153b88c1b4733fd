//! The segment table: looking a segment up, adding one, and giving wholly free ones back to
//! the backing (`empty_cache`, and before growing).

use super::super::block::{Block, BlockState, NIL};
use super::super::stats::StatPool;
use super::segment::{Segment, SegmentKind};
use super::{Pool, SYNCED};

impl Pool {
    /// Gives every wholly free segment obtained from the backing back to it; returns the
    /// number of bytes released. Registered arenas stay.
    pub fn empty_cache(&mut self) -> usize {
        self.flush_caches();
        self.release_cached(usize::MAX)
    }

    #[inline]
    pub(super) fn segment(&self, s: u32) -> &Segment {
        match &self.segments[s as usize] {
            Some(seg) => seg,
            None => unreachable!("block refers to a removed segment"),
        }
    }

    #[inline]
    pub(super) fn segment_mut(&mut self, s: u32) -> &mut Segment {
        match &mut self.segments[s as usize] {
            Some(seg) => seg,
            None => unreachable!("block refers to a removed segment"),
        }
    }

    pub(super) fn overlaps(&self, start: usize, stop: usize) -> bool {
        match self.segment_at.range(..stop).next_back() {
            Some((&base, &s)) => base + self.segment(s).size > start,
            None => false,
        }
    }

    /// Adds a segment holding one free (not yet linked) block; returns the segment index.
    pub(super) fn add_segment(
        &mut self,
        base: usize,
        size: usize,
        kind: SegmentKind,
        registered: (usize, usize),
    ) -> u32 {
        let s = match self.vacant_segments.pop() {
            Some(s) => s,
            None => {
                self.segments.push(None);
                (self.segments.len() - 1) as u32
            }
        };
        let b = self.blocks.insert(Block {
            addr: base,
            size,
            requested: 0,
            segment: s,
            kind: kind.index() as u8,
            prev_phys: NIL,
            next_phys: NIL,
            prev_free: NIL,
            next_free: NIL,
            slot: SYNCED,
            state: BlockState::Free,
            used_elsewhere: false,
            handle_owned: false,
            cached: false,
        });
        self.segments[s as usize] = Some(Segment {
            base,
            size,
            kind,
            registered,
            first: b,
            wholly_free: false,
        });
        self.segment_at.insert(base, s);
        let pool = kind.stat_pool();
        self.stats.segment.add(pool, 1);
        self.stats.reserved_bytes.add(pool, size as u64);
        s
    }

    /// Forgets segment `s`, whose blocks are all free, and returns its region to the
    /// backing unless it is an arena.
    pub(super) fn remove_segment(&mut self, s: u32) {
        let mut b = self.segment(s).first;
        while b != NIL {
            let next = self.blocks.get(b).next_phys;
            self.unlink_free(b);
            self.blocks.remove(b);
            b = next;
        }
        self.set_wholly_free(s, false);
        let Some(seg) = self.segments[s as usize].take() else {
            return;
        };
        self.vacant_segments.push(s);
        self.segment_at.remove(&seg.base);
        let pool = seg.kind.stat_pool();
        self.stats.segment.sub(pool, 1);
        self.stats.reserved_bytes.sub(pool, seg.size as u64);
        if seg.kind != SegmentKind::Arena {
            self.stats.num_device_free += 1;
            // SAFETY: `seg.base`/`seg.size` are exactly what `obtain` returned for this
            // segment (segments from the backing are never resized), it is released once
            // (the segment is gone from every table now) and all its blocks were free.
            unsafe { self.backing.release(seg.base, seg.size) };
        }
    }

    /// Releases wholly free backing segments, largest first, until at least `want` bytes
    /// were released or none is left; returns the bytes released.
    pub(super) fn release_cached(&mut self, want: usize) -> usize {
        // A scan of all segments: this runs when growing or emptying the cache, both of which
        // cost a call to the backing anyway; keeping a list instead would tax every free.
        let mut candidates: Vec<(usize, u32)> = self
            .segment_at
            .values()
            .map(|&s| (self.segment(s), s))
            .filter(|(seg, _)| seg.wholly_free && seg.kind != SegmentKind::Arena)
            .map(|(seg, s)| (seg.size, s))
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        let mut released = 0;
        for (size, s) in candidates {
            if released >= want {
                break;
            }
            self.remove_segment(s);
            released += size;
        }
        self.update_inactive_split(StatPool::Small);
        self.update_inactive_split(StatPool::Large);
        released
    }

    /// Puts segment `s` in or out of the wholly-free list according to its first block.
    #[inline]
    pub(super) fn refresh_wholly_free(&mut self, s: u32) {
        let seg = self.segment(s);
        let first = self.blocks.get(seg.first);
        let whole = first.state == BlockState::Free && first.size == seg.size;
        self.set_wholly_free(s, whole);
    }

    #[inline]
    pub(super) fn set_wholly_free(&mut self, s: u32, whole: bool) {
        let seg = self.segment_mut(s);
        if seg.wholly_free == whole {
            return;
        }
        seg.wholly_free = whole;
        let (size, pool) = (seg.size as u64, seg.kind.stat_pool());
        let c = &mut self.counts[pool as usize];
        if whole {
            c.wholly_free_bytes += size;
            c.wholly_free_segments += 1;
        } else {
            c.wholly_free_bytes -= size;
            c.wholly_free_segments -= 1;
        }
    }

    pub(super) fn any_wholly_free(&self) -> bool {
        self.counts.iter().any(|c| c.wholly_free_segments > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{check, MIB};
    use crate::pool::*;

    #[test]
    fn empty_cache_releases_wholly_free_segments_only() {
        let mut p = Pool::host(None);
        let a = p.malloc(100, 0).unwrap();
        let b = p.malloc(10 * MIB, 0).unwrap();
        let c = p.malloc(3 * MIB, 0).unwrap();
        p.free(b).unwrap();
        check(&p);
        assert_eq!(p.empty_cache(), 10 * MIB);
        assert_eq!(
            p.stats().reserved_bytes.all().current,
            (2 * MIB + 4 * MIB) as u64
        );
        p.free(a).unwrap();
        p.free(c).unwrap();
        p.empty_cache();
        check(&p);
        assert_eq!(p.stats().reserved_bytes.all().current, 0);
        assert_eq!(p.stats().num_device_alloc, 3);
        assert_eq!(p.stats().num_device_free, 3);
        assert_eq!(p.stats().reserved_bytes.all().peak, (16 * MIB) as u64);
    }
}
