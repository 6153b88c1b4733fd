//! The free lists (one TLSF index per stream and segment kind) and the free-space counters
//! from which `inactive_split` is derived.

use super::super::block::Block;
use super::super::stats::StatPool;
use super::super::tlsf::Tlsf;
use super::segment::SegmentKind;
use super::Pool;

impl Pool {
    #[inline]
    pub(super) fn blocks_slice(&self) -> &[Block] {
        self.blocks.as_slice()
    }

    /// Links free block `b` into the lists of its slot and segment kind.
    #[inline]
    pub(super) fn link_free(&mut self, b: u32) {
        let (slot, kind, size) = {
            let blk = self.blocks.get(b);
            (blk.slot, SegmentKind::from_index(blk.kind), blk.size)
        };
        let lists = &mut self.streams[slot as usize].lists[kind.index()];
        lists.insert(self.blocks.as_mut_slice(), b);
        let c = &mut self.counts[kind.stat_pool() as usize];
        c.free_bytes += size as u64;
        c.free_blocks += 1;
    }

    /// Changes the size of free (linked) block `b`, moving it to another list only if its
    /// size class changes.
    #[inline]
    pub(super) fn resize_free(&mut self, b: u32, size: usize) {
        let (kind, old) = {
            let blk = self.blocks.get(b);
            (SegmentKind::from_index(blk.kind), blk.size)
        };
        if Tlsf::same_class(old, size) {
            self.blocks.get_mut(b).size = size;
            let c = &mut self.counts[kind.stat_pool() as usize];
            c.free_bytes = c.free_bytes + size as u64 - old as u64;
        } else {
            self.unlink_free(b);
            self.blocks.get_mut(b).size = size;
            self.link_free(b);
        }
    }

    /// Unlinks free block `b` from its list.
    #[inline]
    pub(super) fn unlink_free(&mut self, b: u32) {
        let (slot, kind, size) = {
            let blk = self.blocks.get(b);
            (blk.slot, SegmentKind::from_index(blk.kind), blk.size)
        };
        let lists = &mut self.streams[slot as usize].lists[kind.index()];
        lists.remove(self.blocks.as_mut_slice(), b);
        let c = &mut self.counts[kind.stat_pool() as usize];
        c.free_bytes -= size as u64;
        c.free_blocks -= 1;
    }

    #[inline]
    pub(super) fn update_inactive_split(&mut self, pool: StatPool) {
        let c = self.counts[pool as usize];
        let bytes = c.free_bytes - c.wholly_free_bytes;
        // Most operations leave it unchanged (e.g. a block taken from and returned to an
        // otherwise free segment); skip the bookkeeping then.
        if bytes != self.stats.inactive_split_bytes.pool(pool).current {
            self.stats.inactive_split_bytes.set(pool, bytes);
        }
        let blocks = c.free_blocks - c.wholly_free_segments;
        if blocks != self.stats.inactive_split.pool(pool).current {
            self.stats.inactive_split.set(pool, blocks);
        }
    }
}
