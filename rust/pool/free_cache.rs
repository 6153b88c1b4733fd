//! A per-stream LIFO cache of recently freed small blocks, in front of the TLSF index.
//!
//! The hot pattern of a caching allocator is "free a block, soon ask for the same size again
//! on the same stream". Going through the TLSF index for it means unlinking, merging with the
//! free neighbours, updating bitmaps, and then splitting the same bytes off again. Like
//! glibc's tcache, this cache keeps a short stack of freed blocks per exact size (in 512 B
//! granules) and stream, so such a pair touches neither the index nor the neighbours.
//!
//! A cached block stays in its segment's block chain marked as cached: for coalescing it is
//! still in use (neighbours do not merge into it), for the statistics and the snapshot it is
//! free (see `Pool`). The pool flushes the cache (frees the blocks for real, with merging)
//! before it would obtain a new segment, on `synchronize()` and on `empty_cache()`, so cached
//! blocks never cost reserved memory.
//!
//! The stacks are threaded through the blocks' `next_free` field, unused while a block is
//! out of the free lists.

use super::block::{Block, NIL};
use super::size::{GRANULE, SMALL_MAX};

/// One class per small size: 512 B … 1 MiB in 512 B steps.
const CLASSES: usize = SMALL_MAX / GRANULE;
/// At most this many blocks per (stream, size): enough for the alloc/free churn of a
/// training step, short enough that a flush stays cheap.
pub const DEPTH: u8 = 4;

/// The cache of one stream.
#[derive(Debug)]
pub struct FreeCache {
    heads: [u32; CLASSES],
    lens: [u8; CLASSES],
    /// Bit `c` is set when class `c` holds a block, so flushing skips empty classes.
    nonempty: [u64; CLASSES / 64],
}

impl Default for FreeCache {
    fn default() -> Self {
        Self {
            heads: [NIL; CLASSES],
            lens: [0; CLASSES],
            nonempty: [0; CLASSES / 64],
        }
    }
}

/// The class of a block size (a multiple of 512), if it is small enough to be cached.
#[inline]
fn class(size: usize) -> Option<usize> {
    let c = (size / GRANULE).wrapping_sub(1);
    (c < CLASSES).then_some(c)
}

impl FreeCache {
    /// Pushes block `b` unless its class is full or its size is not cacheable; returns
    /// whether it was taken.
    #[inline]
    pub fn push(&mut self, blocks: &mut [Block], b: u32) -> bool {
        let Some(c) = class(blocks[b as usize].size) else {
            return false;
        };
        if self.lens[c] >= DEPTH {
            return false;
        }
        blocks[b as usize].next_free = self.heads[c];
        self.heads[c] = b;
        self.lens[c] += 1;
        self.nonempty[c / 64] |= 1 << (c % 64);
        true
    }

    /// Pops the most recently cached block of exactly `size` bytes.
    #[inline]
    pub fn pop(&mut self, blocks: &[Block], size: usize) -> Option<u32> {
        let c = class(size)?;
        let b = self.heads[c];
        if b == NIL {
            return None;
        }
        self.heads[c] = blocks[b as usize].next_free;
        self.lens[c] -= 1;
        if self.lens[c] == 0 {
            self.nonempty[c / 64] &= !(1 << (c % 64));
        }
        Some(b)
    }

    /// Pops any cached block (for flushing).
    pub fn pop_any(&mut self, blocks: &[Block]) -> Option<u32> {
        let (w, bits) = self
            .nonempty
            .iter()
            .enumerate()
            .find(|(_, &bits)| bits != 0)?;
        let c = w * 64 + bits.trailing_zeros() as usize;
        self.pop(blocks, (c + 1) * GRANULE)
    }

    /// Whether block `b` is in this cache (for consistency checks).
    #[cfg(test)]
    pub fn contains(&self, blocks: &[Block], b: u32) -> bool {
        let Some(c) = class(blocks[b as usize].size) else {
            return false;
        };
        let mut i = self.heads[c];
        let mut n = 0;
        while i != NIL {
            if i == b {
                return true;
            }
            n += 1;
            assert!(n <= DEPTH, "cache class {c} longer than its depth");
            i = blocks[i as usize].next_free;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_lifo_per_size_and_bounded() {
        let mut blocks: Vec<Block> = (0..10).map(|i| Block::free(i << 20, 1024)).collect();
        blocks[9].size = 512;
        blocks[8].size = SMALL_MAX + GRANULE;
        let mut c = FreeCache::default();
        for b in 0..DEPTH as u32 {
            assert!(c.push(&mut blocks, b));
        }
        assert!(!c.push(&mut blocks, 7), "class full");
        assert!(!c.push(&mut blocks, 8), "large sizes are not cached");
        assert!(c.push(&mut blocks, 9));
        assert!(c.contains(&blocks, 2) && !c.contains(&blocks, 7));
        assert_eq!(c.pop(&blocks, 1024), Some(DEPTH as u32 - 1));
        assert_eq!(c.pop(&blocks, 1536), None);
        assert_eq!(c.pop_any(&blocks), Some(9), "the smallest class first");
        let mut rest = Vec::new();
        while let Some(b) = c.pop_any(&blocks) {
            rest.push(b);
        }
        assert_eq!(rest, (0..DEPTH as u32 - 1).rev().collect::<Vec<_>>());
        assert_eq!(c.pop(&blocks, 512), None);
    }
}
