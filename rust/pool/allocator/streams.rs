//! Streams: the stream table's slots, `record_stream`, `synchronize` (pending blocks
//! freed, every free block handed to any stream) and flushing the free caches.

use super::super::block::{BlockState, NIL};
use super::super::error::PoolError;
use super::super::stats::StatPool;
use super::segment::SegmentKind;
use super::{Pool, StreamLists, RESERVED_STREAM, SYNCED};

impl Pool {
    /// The size the caller asked for when allocating the live block at `address`.
    pub fn requested_size(&self, address: usize) -> Option<usize> {
        self.live
            .get(&address)
            .map(|&b| self.blocks.get(b).requested)
    }

    /// Records that `stream` uses the allocated block at `address` (besides the stream it
    /// was allocated on): when freed, the block waits for `synchronize()` before reuse.
    pub fn record_stream(&mut self, address: usize, stream: u64) -> Result<(), PoolError> {
        if stream == RESERVED_STREAM {
            return Err(PoolError::ReservedStream { stream });
        }
        let Some(&b) = self.live.get(&address) else {
            return Err(self.diagnose(address));
        };
        let own = self.streams[self.blocks.get(b).slot as usize].stream;
        if own != stream {
            self.blocks.get_mut(b).used_elsewhere = true;
        }
        Ok(())
    }

    /// Declares all work on all streams finished: pending blocks become free, and every free
    /// block becomes reusable by any stream (and merges with its free neighbours).
    pub fn synchronize(&mut self) {
        self.stats.num_sync_all_streams += 1;
        self.flush_caches();
        for b in std::mem::take(&mut self.pending) {
            let (size, kind) = {
                let blk = self.blocks.get_mut(b);
                blk.state = BlockState::Free;
                blk.used_elsewhere = false;
                blk.slot = SYNCED;
                (blk.size, SegmentKind::from_index(blk.kind))
            };
            let pool = kind.stat_pool();
            self.stats.active.sub(pool, 1);
            self.stats.active_bytes.sub(pool, size as u64);
            self.link_free(b);
        }
        let segs: Vec<u32> = self.segment_at.values().copied().collect();
        for s in segs {
            let mut b = self.segment(s).first;
            while b != NIL {
                if self.blocks.get(b).state == BlockState::Free {
                    self.unlink_free(b);
                    loop {
                        let n = self.blocks.get(b).next_phys;
                        if n == NIL || self.blocks.get(n).state != BlockState::Free {
                            break;
                        }
                        self.unlink_free(n);
                        self.absorb_next(b);
                    }
                    self.blocks.get_mut(b).slot = SYNCED;
                    self.link_free(b);
                }
                b = self.blocks.get(b).next_phys;
            }
            self.refresh_wholly_free(s);
        }
        self.update_inactive_split(StatPool::Small);
        self.update_inactive_split(StatPool::Large);
    }

    /// Frees every block of the streams' free caches into the free lists (merging it with
    /// its free neighbours). The pool does this itself whenever it matters (see the module);
    /// exposed for tests and for callers that want a merged `snapshot()`.
    pub fn flush_caches(&mut self) {
        if self.cached_blocks == 0 {
            return;
        }
        for slot in 0..self.streams.len() {
            while let Some(b) = self.streams[slot].cache.pop_any(self.blocks.as_slice()) {
                let size = {
                    let blk = self.blocks.get_mut(b);
                    blk.cached = false;
                    blk.state = BlockState::Free;
                    blk.size as u64
                };
                self.cached_blocks -= 1;
                self.cached_bytes -= size;
                // Cached blocks are counted as free already; `merge_free` counts again.
                let c = &mut self.counts[StatPool::Small as usize];
                c.free_bytes -= size;
                c.free_blocks -= 1;
                self.merge_free(b);
            }
        }
        self.update_inactive_split(StatPool::Small);
    }

    /// The stream's slot in the stream table, created on first use.
    #[inline]
    pub(super) fn slot_of(&mut self, stream: u64) -> u32 {
        if self.last_stream.0 == stream {
            return self.last_stream.1;
        }
        let slot = match self.streams.iter().position(|l| l.stream == stream) {
            Some(i) => i as u32,
            None => {
                self.streams.push(StreamLists::new(stream));
                (self.streams.len() - 1) as u32
            }
        };
        self.last_stream = (stream, slot);
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{check, sim, KIB};
    use crate::pool::*;

    #[test]
    fn a_freed_block_is_reused_only_by_its_stream_until_synchronize() {
        let mut p = sim();
        let a = p.malloc(4 * KIB, 1).unwrap();
        let guard = p.malloc(4 * KIB, 1).unwrap();
        p.free(a).unwrap();
        check(&p);
        // Stream 2 must not get stream 1's freed block.
        let b = p.malloc(4 * KIB, 2).unwrap();
        assert_ne!(b, a);
        check(&p);
        // Stream 1 gets it back.
        let c = p.malloc(4 * KIB, 1).unwrap();
        assert_eq!(c, a);
        p.free(c).unwrap();
        p.synchronize();
        check(&p);
        // After synchronize, any stream may reuse it.
        let d = p.malloc(4 * KIB, 2).unwrap();
        assert_eq!(d, a);
        assert_eq!(p.stats().num_sync_all_streams, 1);
        for x in [b, d, guard] {
            p.free(x).unwrap();
        }
        check(&p);
    }

    #[test]
    fn record_stream_keeps_a_block_pending_until_synchronize() {
        let mut p = sim();
        let a = p.malloc(4 * KIB, 1).unwrap();
        p.record_stream(a, 7).unwrap();
        p.free(a).unwrap();
        check(&p);
        assert_eq!(p.stats().allocated_bytes.all().current, 0);
        assert_eq!(p.stats().active_bytes.all().current, (4 * KIB) as u64);
        // Not reusable, not even by its own stream, and not freeable twice.
        let b = p.malloc(4 * KIB, 1).unwrap();
        assert_ne!(b, a);
        assert_eq!(p.free(a), Err(PoolError::DoubleFree { address: a }));
        p.synchronize();
        check(&p);
        assert_eq!(p.stats().active_bytes.all().current, (4 * KIB) as u64);
        assert_eq!(p.malloc(4 * KIB, 3).unwrap(), a);
        // Recording the block's own stream changes nothing.
        p.record_stream(b, 1).unwrap();
        p.free(b).unwrap();
        assert_eq!(p.malloc(4 * KIB, 1).unwrap(), b);
    }
}
