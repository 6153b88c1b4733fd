//! Blocks and the slab that stores them.
//!
//! A block is a contiguous piece of one segment: free, allocated, or freed-but-pending (freed
//! while other streams may still use it). Blocks live in a slab (a `Vec` indexed by `u32`) so
//! that the physical neighbour links and the free-list links are plain indices: no per-block
//! heap allocation, no pointer chasing through `Box`es.

/// The "no block" index used by every link.
pub const NIL: u32 = u32::MAX;

/// What a block currently is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// In a free list; may be handed out.
    Free,
    /// Handed out to a caller.
    Allocated,
    /// Freed by the caller, but recorded as used on other streams: not reusable until
    /// `synchronize()`.
    Pending,
}

/// One block. `slot` is the stream index it belongs to (0 = synchronized, any stream).
#[derive(Clone, Debug)]
pub struct Block {
    pub addr: usize,
    pub size: usize,
    /// The size the caller asked for (before rounding), for `requested_bytes`.
    pub requested: usize,
    pub segment: u32,
    /// The segment's kind (`SegmentKind::index`), kept here so the hot paths need not look
    /// the segment up.
    pub kind: u8,
    pub prev_phys: u32,
    pub next_phys: u32,
    pub prev_free: u32,
    pub next_free: u32,
    /// Stream index: the allocating stream while allocated, the stream whose free list holds
    /// the block while free (0 = synchronized, reusable by every stream).
    pub slot: u32,
    pub state: BlockState,
    /// Some other stream was recorded as using this block (`record_stream`).
    pub used_elsewhere: bool,
    /// Owned by a Python array handle: the raw `free` refuses it.
    pub handle_owned: bool,
    /// Freed into its stream's [`FreeCache`](super::free_cache::FreeCache): `state` stays
    /// `Allocated` (neighbours do not merge into it) but it is free for every caller.
    pub cached: bool,
}

impl Block {
    /// A free block of `size` bytes at `addr`, linked to nothing (for benchmarks and tests).
    pub fn free(addr: usize, size: usize) -> Self {
        Block {
            addr,
            size,
            requested: 0,
            segment: 0,
            kind: 0,
            prev_phys: NIL,
            next_phys: NIL,
            prev_free: NIL,
            next_free: NIL,
            slot: 0,
            state: BlockState::Free,
            used_elsewhere: false,
            handle_owned: false,
            cached: false,
        }
    }
}

/// A slab of blocks with a stack of vacant indices.
#[derive(Default, Debug)]
pub struct BlockSlab {
    blocks: Vec<Block>,
    vacant: Vec<u32>,
}

impl BlockSlab {
    /// Stores `block`, returning its index.
    pub fn insert(&mut self, block: Block) -> u32 {
        if let Some(i) = self.vacant.pop() {
            self.blocks[i as usize] = block;
            i
        } else {
            // The pool would need 4 billion live blocks (2 TiB at 512 B each) to overflow this.
            let i = u32::try_from(self.blocks.len()).unwrap_or(NIL);
            assert!(i != NIL, "block slab full");
            self.blocks.push(block);
            i
        }
    }

    /// Marks index `i` vacant; its contents are left as they are until reused.
    pub fn remove(&mut self, i: u32) {
        self.vacant.push(i);
    }

    #[inline]
    pub fn get(&self, i: u32) -> &Block {
        &self.blocks[i as usize]
    }

    #[inline]
    pub fn get_mut(&mut self, i: u32) -> &mut Block {
        &mut self.blocks[i as usize]
    }

    /// The whole slab, read-only.
    #[inline]
    pub fn as_slice(&self) -> &[Block] {
        &self.blocks
    }

    /// The whole slab, for the free-list code that links blocks by index.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [Block] {
        &mut self.blocks
    }
}
