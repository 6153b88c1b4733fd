//! Taking a block for a request: the public `malloc` family, the free cache's fast path,
//! the best-fit search (with the large-fit policy) and splitting the block taken.

use super::super::block::{Block, BlockState, NIL};
use super::super::error::PoolError;
use super::super::size::{is_small, round_up, segment_size_for, GRANULE, LARGE_SPLIT_MIN};
use super::super::stats::StatPool;
use super::segment::SegmentKind;
use super::{Pool, RESERVED_STREAM, SYNCED};

impl Pool {
    /// Allocates at least `size` bytes for use on `stream`; returns the address.
    pub fn malloc(&mut self, size: usize, stream: u64) -> Result<usize, PoolError> {
        self.allocate(size, stream, false)
    }

    /// Like [`Pool::malloc`], and checks that `alignment` (a power of two) is one every block
    /// of this pool has.
    pub fn malloc_aligned(
        &mut self,
        size: usize,
        alignment: usize,
        stream: u64,
    ) -> Result<usize, PoolError> {
        self.check_alignment(alignment)?;
        self.allocate(size, stream, false)
    }

    /// Checks that `alignment` is a power of two the pool's blocks satisfy.
    pub fn check_alignment(&self, alignment: usize) -> Result<(), PoolError> {
        if !alignment.is_power_of_two() {
            return Err(PoolError::AlignmentNotPowerOfTwo { alignment });
        }
        let max = self.block_alignment();
        if alignment > max {
            return Err(PoolError::AlignmentTooLarge { alignment, max });
        }
        Ok(())
    }

    /// Allocates a block owned by an array handle: the raw [`Pool::free`] refuses it, only
    /// [`Pool::free_handle`] gives it back.
    pub fn malloc_handle(&mut self, size: usize, stream: u64) -> Result<usize, PoolError> {
        self.allocate(size, stream, true)
    }

    pub(super) fn allocate(
        &mut self,
        size: usize,
        stream: u64,
        handle: bool,
    ) -> Result<usize, PoolError> {
        if size == 0 {
            return Err(PoolError::ZeroSize);
        }
        if stream == RESERVED_STREAM {
            return Err(PoolError::ReservedStream { stream });
        }
        // (Not `ok_or(..)`: building the error eagerly costs a call to its drop per malloc.)
        let Some(rounded) = round_up(size, GRANULE).filter(|&r| r <= isize::MAX as usize) else {
            return Err(PoolError::SizeOverflow { requested: size });
        };
        let slot = self.slot_of(stream);
        let kind = if is_small(rounded) {
            if let Some(b) = self.streams[slot as usize]
                .cache
                .pop(self.blocks.as_slice(), rounded)
            {
                return Ok(self.take_cached(b, size, handle));
            }
            SegmentKind::Small
        } else {
            SegmentKind::Large
        };
        let b = match self.find_free(rounded, slot, kind) {
            Some(b) => b,
            None if self.cached_blocks > 0 => {
                // Cached blocks must never make the pool grow: free them for real first.
                self.flush_caches();
                match self.find_free(rounded, slot, kind) {
                    Some(b) => b,
                    None => self.grow(rounded, size, slot, kind)?,
                }
            }
            None => self.grow(rounded, size, slot, kind)?,
        };
        Ok(self.take(b, rounded, size, slot, handle))
    }

    /// Hands out block `b` just popped from its stream's cache (it is still in its chain,
    /// marked allocated, with the right size and stream); returns the address.
    #[inline]
    pub(super) fn take_cached(&mut self, b: u32, requested: usize, handle: bool) -> usize {
        let (addr, size) = {
            let blk = self.blocks.get_mut(b);
            blk.cached = false;
            blk.requested = requested;
            blk.handle_owned = handle;
            (blk.addr, blk.size)
        };
        self.cached_blocks -= 1;
        self.cached_bytes -= size as u64;
        let c = &mut self.counts[StatPool::Small as usize];
        c.free_bytes -= size as u64;
        c.free_blocks -= 1;
        self.live.insert(addr, b);
        self.count_allocation(StatPool::Small, size, requested);
        addr
    }

    #[inline]
    pub(super) fn count_allocation(&mut self, pool: StatPool, size: usize, requested: usize) {
        let st = &mut self.stats;
        st.allocation.add(pool, 1);
        st.active.add(pool, 1);
        st.allocated_bytes.add(pool, size as u64);
        st.active_bytes.add(pool, size as u64);
        st.requested_bytes.add(pool, requested as u64);
        self.update_inactive_split(pool);
    }

    /// Search order: the stream's own free blocks, then synchronized ones; of the request's
    /// segment kind first, then of registered arenas.
    #[inline]
    pub(super) fn find_free(&self, rounded: usize, slot: u32, kind: SegmentKind) -> Option<u32> {
        let blocks = self.blocks_slice();
        for k in [kind, SegmentKind::Arena] {
            for s in [slot, SYNCED] {
                if let Some(b) = self.streams[s as usize].lists[k.index()].find(blocks, rounded) {
                    // A large block much bigger than the request would leave a long-lived
                    // hole; a fresh segment of the right size is better (see `Policy`).
                    // (A block no larger than the segment the request would get anyway is
                    // always fine.)
                    let size = blocks[b as usize].size;
                    if k == SegmentKind::Large
                        && size > segment_size_for(rounded).unwrap_or(usize::MAX)
                        && (size - rounded) as f64 > rounded as f64 * self.policy.large_fit_slack
                    {
                        continue;
                    }
                    return Some(b);
                }
            }
        }
        None
    }

    /// Hands out free block `b` for a request of `rounded` bytes on `slot`, splitting off the
    /// rest when it is worth keeping; returns the address.
    pub(super) fn take(
        &mut self,
        b: u32,
        rounded: usize,
        requested: usize,
        slot: u32,
        handle: bool,
    ) -> usize {
        let (addr, size, seg, prev_slot, kind_index) = {
            let blk = self.blocks.get(b);
            (blk.addr, blk.size, blk.segment, blk.slot, blk.kind)
        };
        let kind = SegmentKind::from_index(kind_index);
        let rest = size - rounded;
        let split = match kind {
            SegmentKind::Large => rest > LARGE_SPLIT_MIN,
            SegmentKind::Small | SegmentKind::Arena => rest >= GRANULE,
        };
        let (b, addr, size) = if split {
            // Carve the request from the end of the free block: the free part keeps its
            // place (and, nearly always, its size class) in the free lists, so no list is
            // touched, and freeing the request later grows it back in place.
            let next = self.blocks.get(b).next_phys;
            let a_addr = addr + rest;
            let a = self.blocks.insert(Block {
                addr: a_addr,
                size: rounded,
                requested,
                segment: seg,
                kind: kind_index,
                prev_phys: b,
                next_phys: next,
                prev_free: NIL,
                next_free: NIL,
                slot,
                state: BlockState::Allocated,
                used_elsewhere: false,
                handle_owned: handle,
                cached: false,
            });
            if next != NIL {
                self.blocks.get_mut(next).prev_phys = a;
            }
            self.blocks.get_mut(b).next_phys = a;
            // The free remainder stays with the stream (or synchronized state) it had.
            debug_assert_eq!(self.blocks.get(b).slot, prev_slot);
            self.resize_free(b, rest);
            (a, a_addr, rounded)
        } else {
            self.unlink_free(b);
            let blk = self.blocks.get_mut(b);
            blk.requested = requested;
            blk.slot = slot;
            blk.state = BlockState::Allocated;
            blk.used_elsewhere = false;
            blk.handle_owned = handle;
            (b, addr, size)
        };
        self.refresh_wholly_free(seg);
        self.live.insert(addr, b);
        self.count_allocation(kind.stat_pool(), size, requested);
        addr
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{check, sim, KIB, MIB};
    use crate::pool::*;

    #[test]
    fn requests_round_to_512_and_small_ones_share_a_2mib_segment() {
        let mut p = sim();
        let a = p.malloc(1, 0).unwrap();
        let b = p.malloc(513, 0).unwrap();
        let c = p.malloc(MIB, 0).unwrap();
        check(&p);
        let snap = p.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].size, 2 * MIB);
        assert_eq!(snap[0].kind, SegmentKind::Small);
        // Requests are carved from the end of the free space, so they go downwards.
        assert_eq!(a - b, 1024);
        assert_eq!(b - c, MIB);
        assert_eq!(a + 512, snap[0].address + snap[0].size);
        assert_eq!(
            p.stats().allocated_bytes.all().current,
            (512 + 1024 + MIB) as u64
        );
        assert_eq!(
            p.stats().requested_bytes.all().current,
            (1 + 513 + MIB) as u64
        );
        for x in [a, b, c] {
            p.free(x).unwrap();
        }
        check(&p);
        // The freed blocks wait in the stream's free cache, free but not merged yet.
        let cached = |p: &Pool| p.snapshot()[0].blocks.iter().filter(|b| b.cached).count();
        assert_eq!(cached(&p), 3);
        p.flush_caches();
        check(&p);
        assert_eq!(cached(&p), 0);
        assert_eq!(p.snapshot()[0].blocks.len(), 1, "everything merged back");
    }

    #[test]
    fn large_requests_get_their_own_segment_rounded_to_2mib() {
        let mut p = sim();
        let a = p.malloc(MIB + 1, 0).unwrap();
        let b = p.malloc(5 * MIB, 0).unwrap();
        check(&p);
        let snap = p.snapshot();
        assert_eq!(snap.len(), 2);
        assert!(snap.iter().all(|s| s.kind == SegmentKind::Large));
        assert_eq!(snap[0].size, 2 * MIB);
        assert_eq!(snap[1].size, 6 * MIB);
        // The 1 MiB + 512 request keeps its whole segment: a remainder of ≤ 1 MiB is not split.
        assert_eq!(snap[0].blocks.len(), 1);
        assert_eq!(
            p.stats().allocated_bytes.all().current,
            (2 * MIB + 6 * MIB) as u64
        );
        // Likewise 5 MiB in a 6 MiB segment; 9 MiB in a 10 MiB one.
        assert_eq!(snap[1].blocks.len(), 1);
        let c = p.malloc(9 * MIB, 0).unwrap();
        assert_eq!(p.snapshot()[2].size, 10 * MIB);
        for x in [a, b, c] {
            p.free(x).unwrap();
        }
        check(&p);
    }

    #[test]
    fn best_fit_picks_the_smallest_hole_and_frees_coalesce() {
        let mut p = sim();
        // Carve one small segment into blocks of 8, 2, 4, 2, 16 KiB with guards between holes.
        let sizes = [8 * KIB, 2 * KIB, 4 * KIB, 2 * KIB, 16 * KIB, 2 * KIB];
        let addrs: Vec<usize> = sizes.iter().map(|&s| p.malloc(s, 0).unwrap()).collect();
        // Free the 8, 4 and 16 KiB blocks: holes of 8, 4, 16 KiB separated by live 2 KiB guards.
        for i in [0, 2, 4] {
            p.free(addrs[i]).unwrap();
        }
        // Out of the free cache, into the index (where best fit looks).
        p.flush_caches();
        check(&p);
        // A 3 KiB request must land in the 4 KiB hole, a 6 KiB one in the 8 KiB hole.
        let x = p.malloc(3 * KIB, 0).unwrap();
        assert!(addrs[2] <= x && x + 3 * KIB <= addrs[2] + 4 * KIB);
        let y = p.malloc(6 * KIB, 0).unwrap();
        assert!(addrs[0] <= y && y + 6 * KIB <= addrs[0] + 8 * KIB);
        check(&p);
        // Freeing the guards merges everything around them.
        for a in [x, y, addrs[1], addrs[3], addrs[5]] {
            p.free(a).unwrap();
        }
        p.flush_caches();
        check(&p);
        let snap = p.snapshot();
        assert_eq!(snap[0].blocks.len(), 1);
        assert_eq!(p.stats().inactive_split_bytes.all().current, 0);
    }
}
