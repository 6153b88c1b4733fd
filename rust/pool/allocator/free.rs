//! Freeing: the public `free` family, the free cache, merging with free neighbours, and
//! telling a double free, an address inside a block and a foreign address apart.

use super::super::block::{BlockState, NIL};
use super::super::error::PoolError;
use super::super::size::GRANULE;
use super::segment::SegmentKind;
use super::{Pool, CACHE_MAX_BYTES, SYNCED};

impl Pool {
    /// Frees a block returned by [`Pool::malloc`].
    pub fn free(&mut self, address: usize) -> Result<(), PoolError> {
        self.deallocate(address, false)
    }

    /// Frees a block returned by [`Pool::malloc_handle`].
    pub fn free_handle(&mut self, address: usize) -> Result<(), PoolError> {
        self.deallocate(address, true)
    }

    pub(super) fn deallocate(&mut self, address: usize, handle: bool) -> Result<(), PoolError> {
        let Some(b) = self.live.remove(&address) else {
            return Err(self.diagnose(address));
        };
        let (size, requested, kind, owned, elsewhere) = {
            let blk = self.blocks.get(b);
            (
                blk.size,
                blk.requested,
                SegmentKind::from_index(blk.kind),
                blk.handle_owned,
                blk.used_elsewhere,
            )
        };
        if owned && !handle {
            self.live.insert(address, b);
            return Err(PoolError::OwnedByArray { address });
        }
        let pool = kind.stat_pool();
        let st = &mut self.stats;
        st.allocation.sub(pool, 1);
        st.allocated_bytes.sub(pool, size as u64);
        st.requested_bytes.sub(pool, requested as u64);
        if elsewhere {
            // Another stream may still use it: keep it out of every free list until
            // `synchronize()`; it still counts as active.
            self.blocks.get_mut(b).state = BlockState::Pending;
            self.pending.push(b);
            return Ok(());
        }
        st.active.sub(pool, 1);
        st.active_bytes.sub(pool, size as u64);
        if kind == SegmentKind::Small && self.cached_bytes + size as u64 <= CACHE_MAX_BYTES {
            let slot = self.blocks.get(b).slot as usize;
            if self.streams[slot].cache.push(self.blocks.as_mut_slice(), b) {
                self.blocks.get_mut(b).cached = true;
                self.cached_blocks += 1;
                self.cached_bytes += size as u64;
                let c = &mut self.counts[pool as usize];
                c.free_bytes += size as u64;
                c.free_blocks += 1;
                self.update_inactive_split(pool);
                return Ok(());
            }
        }
        self.blocks.get_mut(b).state = BlockState::Free;
        self.merge_free(b);
        self.update_inactive_split(pool);
        Ok(())
    }

    /// Puts block `b` (just marked free, in no list) into the free lists of its stream,
    /// merged with its mergeable free neighbours.
    pub(super) fn merge_free(&mut self, b: u32) {
        let (slot, seg) = {
            let blk = self.blocks.get(b);
            (blk.slot, blk.segment)
        };
        let next = self.blocks.get(b).next_phys;
        if next != NIL && self.mergeable(next, slot) {
            self.unlink_free(next);
            self.absorb_next(b);
        }
        let prev = self.blocks.get(b).prev_phys;
        if prev != NIL && self.mergeable(prev, slot) {
            if self.blocks.get(prev).slot == slot {
                // The free block before stays in its list and grows in place.
                let grown = self.blocks.get(prev).size + self.blocks.get(b).size;
                self.unchain_next(prev);
                self.resize_free(prev, grown);
            } else {
                // A synchronized neighbour joins this stream's block (the stricter rule).
                self.unlink_free(prev);
                self.absorb_next(prev);
                self.blocks.get_mut(prev).slot = slot;
                self.link_free(prev);
            }
        } else {
            self.link_free(b);
        }
        self.refresh_wholly_free(seg);
    }

    /// Whether free-list neighbour `n` may merge with a block freed on `slot`.
    #[inline]
    pub(super) fn mergeable(&self, n: u32, slot: u32) -> bool {
        let blk = self.blocks.get(n);
        blk.state == BlockState::Free && (blk.slot == slot || blk.slot == SYNCED)
    }

    /// Merges `b`'s physical successor (not in any free list) into `b` (not in any free
    /// list either: its size changes).
    pub(super) fn absorb_next(&mut self, b: u32) {
        let n_size = self.unchain_next(b);
        self.blocks.get_mut(b).size += n_size;
    }

    /// Removes `b`'s physical successor (not in any free list) from the chain and the slab,
    /// leaving `b`'s size to the caller; returns the successor's size.
    #[inline]
    pub(super) fn unchain_next(&mut self, b: u32) -> usize {
        let n = self.blocks.get(b).next_phys;
        let (n_size, n_next) = {
            let nb = self.blocks.get(n);
            (nb.size, nb.next_phys)
        };
        self.blocks.get_mut(b).next_phys = n_next;
        if n_next != NIL {
            self.blocks.get_mut(n_next).prev_phys = b;
        }
        self.blocks.remove(n);
        n_size
    }

    /// Why `address` cannot be freed: a double free, not a block start, or foreign.
    pub(super) fn diagnose(&self, address: usize) -> PoolError {
        let Some((_, &s)) = self.segment_at.range(..=address).next_back() else {
            return PoolError::ForeignAddress { address };
        };
        let seg = self.segment(s);
        if address >= seg.base + seg.size {
            return PoolError::ForeignAddress { address };
        }
        let mut b = seg.first;
        while b != NIL {
            let blk = self.blocks.get(b);
            if blk.addr == address {
                return PoolError::DoubleFree { address };
            }
            if blk.addr < address && address < blk.addr + blk.size {
                // Inside a free block that absorbed an earlier, freed block start.
                return if blk.state == BlockState::Free && address.is_multiple_of(GRANULE) {
                    PoolError::DoubleFree { address }
                } else {
                    PoolError::NotBlockStart { address }
                };
            }
            b = blk.next_phys;
        }
        PoolError::NotBlockStart { address }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{check, sim, KIB, MIB};
    use crate::pool::*;

    #[test]
    fn the_free_cache_returns_a_freed_block_to_its_stream_and_counts_it_as_free() {
        let mut p = sim();
        let a = p.malloc(4 * KIB, 1).unwrap();
        let guard = p.malloc(512, 1).unwrap();
        p.free(a).unwrap();
        check(&p);
        // Free for every statistic: not allocated, not active, an inactive split block
        // (as are the remainder before it: 2 MiB - 4.5 KiB, and nothing else).
        let st = p.stats().clone();
        assert_eq!(st.allocated_bytes.all().current, 512);
        assert_eq!(st.active_bytes.all().current, 512);
        assert_eq!(st.inactive_split.all().current, 2);
        assert_eq!(
            st.inactive_split_bytes.all().current,
            (2 * MIB - 512) as u64
        );
        let snap = p.snapshot();
        let blk = snap[0].blocks.iter().find(|b| b.cached).unwrap();
        assert_eq!(snap[0].address + blk.offset, a);
        assert_eq!(
            (blk.size, blk.state, blk.stream, blk.requested),
            (4 * KIB, BlockState::Free, Some(1), 0)
        );
        // Not merged, not in the index: other sizes do not get it ...
        let other = p.malloc(2 * KIB, 1).unwrap();
        assert!(other + 2 * KIB <= a || other >= a + 4 * KIB);
        // ... and a double free or `record_stream` of it is still refused.
        assert_eq!(p.free(a), Err(PoolError::DoubleFree { address: a }));
        assert_eq!(
            p.record_stream(a, 3),
            Err(PoolError::DoubleFree { address: a })
        );
        // The same size on the same stream takes it back.
        assert_eq!(p.malloc(4000, 1).unwrap(), a);
        assert_eq!(p.requested_size(a), Some(4000));
        check(&p);
        p.free(a).unwrap();
        p.free(other).unwrap();
        // Flushing frees them for real: `other` merges with the free remainder before it.
        assert_eq!(p.snapshot()[0].blocks.len(), 4);
        // (Layout, downwards: remainder, other, guard, a.)
        p.flush_caches();
        check(&p);
        assert_eq!(p.snapshot()[0].blocks.len(), 3);
        // Stream 2 cannot use stream 1's segment: it grows, and growing flushes first.
        p.free(guard).unwrap();
        assert_ne!(p.malloc(4 * KIB, 2).unwrap(), a);
        assert!(p
            .snapshot()
            .iter()
            .all(|s| s.blocks.iter().all(|b| !b.cached)));
        check(&p);
    }

    #[test]
    fn cached_blocks_never_make_the_pool_grow() {
        // Four 512 KiB blocks fill one small segment; freed, they sit in the cache. A 1 MiB
        // request fits only once they are merged: the pool flushes instead of growing.
        let mut p = sim();
        let xs: Vec<usize> = (0..4).map(|_| p.malloc(512 * KIB, 0).unwrap()).collect();
        assert_eq!(p.stats().segment.all().current, 1);
        for &x in &xs {
            p.free(x).unwrap();
        }
        check(&p);
        let y = p.malloc(MIB, 0).unwrap();
        check(&p);
        assert_eq!(p.stats().segment.all().current, 1);
        assert_eq!(p.stats().num_device_alloc, 1);
        p.free(y).unwrap();
        // synchronize() and empty_cache() flush too: everything is given back.
        p.synchronize();
        assert!(p.snapshot()[0].blocks.iter().all(|b| !b.cached));
        assert_eq!(p.empty_cache(), 2 * MIB);
        check(&p);
    }

    #[test]
    fn misuse_is_an_error_never_undefined_behaviour() {
        let mut p = sim();
        assert_eq!(p.malloc(0, 0), Err(PoolError::ZeroSize));
        assert!(matches!(
            p.malloc(usize::MAX - 10, 0),
            Err(PoolError::SizeOverflow { .. })
        ));
        assert_eq!(
            p.malloc(8, RESERVED_STREAM),
            Err(PoolError::ReservedStream {
                stream: RESERVED_STREAM
            })
        );
        assert_eq!(
            p.malloc_aligned(8, 48, 0),
            Err(PoolError::AlignmentNotPowerOfTwo { alignment: 48 })
        );
        assert_eq!(
            p.malloc_aligned(8, 4096, 0),
            Err(PoolError::AlignmentTooLarge {
                alignment: 4096,
                max: 512
            })
        );
        let a = p.malloc_aligned(8, 256, 0).unwrap();
        let b = p.malloc(4096, 0).unwrap();
        assert_eq!(
            p.free(12345),
            Err(PoolError::ForeignAddress { address: 12345 })
        );
        assert_eq!(
            p.free(b + 512),
            Err(PoolError::NotBlockStart { address: b + 512 })
        );
        p.free(a).unwrap();
        assert_eq!(p.free(a), Err(PoolError::DoubleFree { address: a }));
        // `b` merges with the free `a` before it and the free tail after it; a second free of
        // `b` points into that merged free block and is still recognised.
        p.free(b).unwrap();
        assert_eq!(p.free(b), Err(PoolError::DoubleFree { address: b }));
        let h = p.malloc_handle(100, 0).unwrap();
        assert_eq!(p.free(h), Err(PoolError::OwnedByArray { address: h }));
        p.free_handle(h).unwrap();
        assert!(p.record_stream(h, 3).is_err());
        check(&p);
    }
}
