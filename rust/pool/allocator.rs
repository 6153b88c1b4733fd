//! The pool: segments from a backing, carved into blocks, indexed per stream.
//!
//! # Model
//! - A *segment* is one region from the backing (or one registered arena). Small requests
//!   (≤ 1 MiB after rounding to 512 B) share 2 MiB small segments; a larger request gets a
//!   large segment of its own, rounded to 2 MiB, whose free space later serves other large
//!   requests. Arenas serve both when nothing else fits.
//! - A segment is a chain of *blocks* in address order (`prev_phys`/`next_phys`). A request
//!   takes the best-fitting free block (see [`tlsf`](super::tlsf)) and splits off the rest;
//!   a free merges the block with free neighbours.
//! - Streams, as in PyTorch's caching allocator: a block freed by stream `s` goes back to
//!   the free lists of `s` and is reused only by requests on `s` (work queued on `s` may still
//!   read it, and work on `s` is ordered after it). `synchronize()` declares all queued work
//!   done: every free block moves to the *synchronized* lists (slot 0), reusable by any
//!   stream. `record_stream(addr, t)` says another stream `t` uses an allocated block; when
//!   it is freed it stays *pending* (not reusable, still counted as active) until
//!   `synchronize()`.
//! - Merging respects streams: two free neighbours merge when they belong to the same stream
//!   or one of them is synchronized (the merged block keeps the stricter stream). So adjacent
//!   free blocks always belong to two different, unsynchronized streams.
//! - A freed small block first goes to its stream's [`FreeCache`] (a short LIFO per exact
//!   size), and a request of that size on that stream takes it back without touching the
//!   index or the neighbours. A cached block counts as allocated for coalescing (its free
//!   neighbours stay apart) and as free everywhere else: `stats()` counts it as inactive
//!   (not allocated, not active; an `inactive_split` block), `snapshot()` lists it as a free
//!   block marked `cached`. The cache is flushed (its blocks freed for real, with merging)
//!   before the pool would obtain a new segment (so it never costs reserved memory), on
//!   `synchronize()` and on `empty_cache()`.
//! - `empty_cache()` gives wholly free segments back to the backing (registered arenas stay:
//!   the pool never frees memory it did not obtain). When the byte limit or the backing
//!   refuses a new segment, the pool first empties its cache and retries, then fails with
//!   an out-of-memory error.

use std::collections::BTreeMap;

use super::addr_map::AddrMap;
use super::backing::{Backing, HostBacking};
use super::block::{Block, BlockSlab, BlockState, NIL};
use super::error::PoolError;
use super::free_cache::FreeCache;
use super::size::{is_small, round_down, round_up, segment_size_for, GRANULE, LARGE_SPLIT_MIN};
use super::snapshot::{BlockInfo, SegmentInfo};
use super::stats::{StatPool, Stats};
use super::tlsf::Tlsf;

/// The stream id the pool keeps for itself (it marks synchronized free blocks internally).
pub const RESERVED_STREAM: u64 = u64::MAX;
/// The two knobs that trade reserved memory against calls to the backing.
///
/// Chosen by replaying RMM's random workload (sizes 1 KiB…64 MiB, 16000 MiB live cap):
/// PyTorch's policy (keep every cached segment, split any large block) reached a
/// fragmentation (peak reserved / peak allocated) of 1.17–1.22; the defaults below reach
/// 1.10 at the cost of obtaining a segment for ~11 % of the requests instead of ~0.4 %.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Before obtaining a new segment, wholly free segments are given back (largest first)
    /// while reserved memory would exceed this multiple of allocated memory.
    /// `f64::INFINITY` keeps every cached segment until the limit or the backing says no.
    pub cache_ratio: f64,
    /// A large request does not take a free block that would leave more than this fraction
    /// of the request unused (a hole that outlives it); it gets a new segment instead.
    /// `f64::INFINITY` takes any block that fits (plain best fit).
    pub large_fit_slack: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cache_ratio: 1.1,
            large_fit_slack: 0.25,
        }
    }
}

/// Slot 0 of the stream table holds the synchronized free blocks.
const SYNCED: u32 = 0;

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
    fn index(self) -> usize {
        match self {
            SegmentKind::Small => 0,
            SegmentKind::Large => 1,
            SegmentKind::Arena => 2,
        }
    }

    #[inline]
    fn from_index(i: u8) -> Self {
        match i {
            0 => SegmentKind::Small,
            1 => SegmentKind::Large,
            _ => SegmentKind::Arena,
        }
    }

    fn stat_pool(self) -> StatPool {
        match self {
            SegmentKind::Small => StatPool::Small,
            SegmentKind::Large | SegmentKind::Arena => StatPool::Large,
        }
    }
}

#[derive(Debug)]
struct Segment {
    base: usize,
    size: usize,
    kind: SegmentKind,
    /// For arenas, what the caller registered (before alignment to 512 B).
    registered: (usize, usize),
    first: u32,
    /// The segment is one free block (counted in `FreeCounts`).
    wholly_free: bool,
}

/// The free lists of one stream, one TLSF index per segment kind, and its cache of freed
/// small blocks.
#[derive(Debug)]
struct StreamLists {
    stream: u64,
    lists: [Tlsf; 3],
    cache: FreeCache,
}

impl StreamLists {
    // Out of line and cold: building the 12 KiB table on the stack would otherwise give every
    // `malloc` a frame that needs stack probing.
    #[cold]
    #[inline(never)]
    fn new(stream: u64) -> Box<Self> {
        Box::new(Self {
            stream,
            lists: Default::default(),
            cache: FreeCache::default(),
        })
    }
}

/// At most this many bytes sit in the free caches of a pool (all streams together).
const CACHE_MAX_BYTES: u64 = 32 << 20;

/// Free-space counters of one stat pool (cached blocks included), from which
/// `inactive_split` is derived.
#[derive(Clone, Copy, Debug, Default)]
struct FreeCounts {
    free_bytes: u64,
    free_blocks: u64,
    wholly_free_bytes: u64,
    wholly_free_segments: u64,
}

/// A caching allocator over a [`Backing`]. Not thread-safe by itself: wrap it in a mutex to
/// share it (the Python bindings do).
pub struct Pool {
    backing: Box<dyn Backing>,
    limit: Option<u64>,
    policy: Policy,
    blocks: BlockSlab,
    segments: Vec<Option<Segment>>,
    vacant_segments: Vec<u32>,
    segment_at: BTreeMap<usize, u32>,
    live: AddrMap,
    streams: Vec<Box<StreamLists>>,
    last_stream: (u64, u32),
    pending: Vec<u32>,
    /// Blocks and bytes in the free caches of all streams.
    cached_blocks: u64,
    cached_bytes: u64,
    counts: [FreeCounts; 3],
    stats: Stats,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("backing", &self.backing.name())
            .field("limit", &self.limit)
            .field("segments", &self.segment_at.len())
            .field("live_blocks", &self.live.len())
            .finish()
    }
}

impl Pool {
    /// A pool over `backing`, with an optional limit on reserved bytes.
    pub fn new(backing: Box<dyn Backing>, limit: Option<u64>) -> Self {
        Self::with_policy(backing, limit, Policy::default())
    }

    /// A pool over `backing` with a caching [`Policy`] of its own.
    pub fn with_policy(backing: Box<dyn Backing>, limit: Option<u64>, policy: Policy) -> Self {
        Self {
            backing,
            limit,
            policy,
            blocks: BlockSlab::default(),
            segments: Vec::new(),
            vacant_segments: Vec::new(),
            segment_at: BTreeMap::new(),
            live: AddrMap::default(),
            streams: vec![StreamLists::new(RESERVED_STREAM)],
            last_stream: (RESERVED_STREAM, SYNCED),
            pending: Vec::new(),
            cached_blocks: 0,
            cached_bytes: 0,
            counts: [FreeCounts::default(); 3],
            stats: Stats::default(),
        }
    }

    /// A pool of host memory (2 MiB-aligned segments, huge pages advised), with an optional
    /// byte limit.
    pub fn host(limit: Option<u64>) -> Self {
        Self::new(Box::new(HostBacking::default()), limit)
    }

    /// The byte limit on reserved memory, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The name of the backing ("host", "arenas only", "simulated").
    pub fn backing_name(&self) -> &'static str {
        self.backing.name()
    }

    /// The alignment every block address has: 512 B, or the backing's if smaller.
    pub fn block_alignment(&self) -> usize {
        GRANULE.min(self.backing.alignment())
    }

    /// The statistics.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Sets every peak statistic to its current value.
    pub fn reset_peak_stats(&mut self) {
        self.stats.reset_peak();
    }

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

    /// Frees a block returned by [`Pool::malloc`].
    pub fn free(&mut self, address: usize) -> Result<(), PoolError> {
        self.deallocate(address, false)
    }

    /// Frees a block returned by [`Pool::malloc_handle`].
    pub fn free_handle(&mut self, address: usize) -> Result<(), PoolError> {
        self.deallocate(address, true)
    }

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

    /// Gives every wholly free segment obtained from the backing back to it; returns the
    /// number of bytes released. Registered arenas stay.
    pub fn empty_cache(&mut self) -> usize {
        self.flush_caches();
        self.release_cached(usize::MAX)
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

    /// Registers an external arena `[base, base + size)`: the pool carves blocks from it
    /// (after aligning it to 512 B) and never frees it. The arena counts as reserved memory.
    pub fn register_arena(&mut self, base: usize, size: usize) -> Result<(), PoolError> {
        let end = base
            .checked_add(size)
            .ok_or(PoolError::ArenaTooSmall { base, size })?;
        let start = round_up(base, GRANULE).ok_or(PoolError::ArenaTooSmall { base, size })?;
        let stop = round_down(end, GRANULE);
        if base == 0 || stop <= start {
            return Err(PoolError::ArenaTooSmall { base, size });
        }
        if self.overlaps(start, stop) {
            return Err(PoolError::ArenaOverlap { base, size });
        }
        let s = self.add_segment(start, stop - start, SegmentKind::Arena, (base, size));
        let b = self.segment(s).first;
        self.link_free(b);
        self.refresh_wholly_free(s);
        self.update_inactive_split(StatPool::Large);
        Ok(())
    }

    /// Removes the arena registered at `base`; it must have no live (allocated or pending)
    /// block. The pool forgets it; the memory stays the caller's.
    pub fn unregister_arena(&mut self, base: usize) -> Result<(), PoolError> {
        let s = self
            .segment_at
            .values()
            .copied()
            .find(|&s| {
                let seg = self.segment(s);
                seg.kind == SegmentKind::Arena && seg.registered.0 == base
            })
            .ok_or(PoolError::UnknownArena { base })?;
        let mut live = 0;
        let mut b = self.segment(s).first;
        while b != NIL {
            if self.blocks.get(b).state != BlockState::Free {
                live += 1;
            }
            b = self.blocks.get(b).next_phys;
        }
        if live > 0 {
            return Err(PoolError::ArenaInUse { base, live });
        }
        self.remove_segment(s);
        self.update_inactive_split(StatPool::Large);
        Ok(())
    }

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

    // ---- allocation ---------------------------------------------------------------------

    fn allocate(&mut self, size: usize, stream: u64, handle: bool) -> Result<usize, PoolError> {
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
    fn take_cached(&mut self, b: u32, requested: usize, handle: bool) -> usize {
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
    fn count_allocation(&mut self, pool: StatPool, size: usize, requested: usize) {
        let st = &mut self.stats;
        st.allocation.add(pool, 1);
        st.active.add(pool, 1);
        st.allocated_bytes.add(pool, size as u64);
        st.active_bytes.add(pool, size as u64);
        st.requested_bytes.add(pool, requested as u64);
        self.update_inactive_split(pool);
    }

    /// The stream's slot in the stream table, created on first use.
    #[inline]
    fn slot_of(&mut self, stream: u64) -> u32 {
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

    /// Search order: the stream's own free blocks, then synchronized ones; of the request's
    /// segment kind first, then of registered arenas.
    #[inline]
    fn find_free(&self, rounded: usize, slot: u32, kind: SegmentKind) -> Option<u32> {
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

    /// Obtains a new segment for a request that no free block fits; returns its (free,
    /// linked) block.
    fn grow(
        &mut self,
        rounded: usize,
        requested: usize,
        slot: u32,
        kind: SegmentKind,
    ) -> Result<u32, PoolError> {
        let seg_size = segment_size_for(rounded).ok_or(PoolError::SizeOverflow { requested })?;
        // Keep the cache in proportion: if growing would make reserved memory exceed
        // `cache_ratio` times what is allocated after this request, give wholly free
        // segments back first (largest first). A free segment that no request fits is
        // otherwise dead weight, and on random workloads it is what fragmentation is made of.
        let allocated = self.stats.allocated_bytes.all().current + rounded as u64;
        let reserved = self.stats.reserved_bytes.all().current + seg_size as u64;
        let budget = (allocated as f64 * self.policy.cache_ratio).min(u64::MAX as f64) as u64;
        if reserved > budget && self.any_wholly_free() {
            self.release_cached((reserved - budget) as usize);
        }
        let mut retried = false;
        let base = loop {
            let within_limit = self
                .limit
                .is_none_or(|l| self.stats.reserved_bytes.all().current + seg_size as u64 <= l);
            let base = if within_limit {
                self.backing.obtain(seg_size)
            } else {
                None
            };
            if let Some(base) = base {
                break base;
            }
            if !retried && self.any_wholly_free() {
                retried = true;
                self.stats.num_alloc_retries += 1;
                self.release_cached(usize::MAX);
                continue;
            }
            self.stats.num_ooms += 1;
            let allocated = self.stats.allocated_bytes.all().current;
            let reserved = self.stats.reserved_bytes.all().current;
            return Err(match self.limit {
                Some(limit) if !within_limit => PoolError::LimitExceeded {
                    requested,
                    allocated,
                    reserved,
                    limit,
                },
                _ => PoolError::BackingExhausted {
                    backing: self.backing.name(),
                    segment: seg_size,
                    requested,
                    allocated,
                    reserved,
                },
            });
        };
        self.stats.num_device_alloc += 1;
        let s = self.add_segment(base, seg_size, kind, (base, seg_size));
        let b = self.segment(s).first;
        self.blocks.get_mut(b).slot = slot;
        self.link_free(b);
        self.refresh_wholly_free(s);
        Ok(b)
    }

    /// Hands out free block `b` for a request of `rounded` bytes on `slot`, splitting off the
    /// rest when it is worth keeping; returns the address.
    fn take(&mut self, b: u32, rounded: usize, requested: usize, slot: u32, handle: bool) -> usize {
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

    // ---- free ---------------------------------------------------------------------------

    fn deallocate(&mut self, address: usize, handle: bool) -> Result<(), PoolError> {
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
    fn merge_free(&mut self, b: u32) {
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
    fn mergeable(&self, n: u32, slot: u32) -> bool {
        let blk = self.blocks.get(n);
        blk.state == BlockState::Free && (blk.slot == slot || blk.slot == SYNCED)
    }

    /// Merges `b`'s physical successor (not in any free list) into `b` (not in any free
    /// list either: its size changes).
    fn absorb_next(&mut self, b: u32) {
        let n_size = self.unchain_next(b);
        self.blocks.get_mut(b).size += n_size;
    }

    /// Removes `b`'s physical successor (not in any free list) from the chain and the slab,
    /// leaving `b`'s size to the caller; returns the successor's size.
    #[inline]
    fn unchain_next(&mut self, b: u32) -> usize {
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
    fn diagnose(&self, address: usize) -> PoolError {
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

    // ---- segments -----------------------------------------------------------------------

    #[inline]
    fn segment(&self, s: u32) -> &Segment {
        match &self.segments[s as usize] {
            Some(seg) => seg,
            None => unreachable!("block refers to a removed segment"),
        }
    }

    #[inline]
    fn segment_mut(&mut self, s: u32) -> &mut Segment {
        match &mut self.segments[s as usize] {
            Some(seg) => seg,
            None => unreachable!("block refers to a removed segment"),
        }
    }

    fn overlaps(&self, start: usize, stop: usize) -> bool {
        match self.segment_at.range(..stop).next_back() {
            Some((&base, &s)) => base + self.segment(s).size > start,
            None => false,
        }
    }

    /// Adds a segment holding one free (not yet linked) block; returns the segment index.
    fn add_segment(
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
    fn remove_segment(&mut self, s: u32) {
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
    fn release_cached(&mut self, want: usize) -> usize {
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
    fn refresh_wholly_free(&mut self, s: u32) {
        let seg = self.segment(s);
        let first = self.blocks.get(seg.first);
        let whole = first.state == BlockState::Free && first.size == seg.size;
        self.set_wholly_free(s, whole);
    }

    #[inline]
    fn set_wholly_free(&mut self, s: u32, whole: bool) {
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

    fn any_wholly_free(&self) -> bool {
        self.counts.iter().any(|c| c.wholly_free_segments > 0)
    }

    // ---- free lists ---------------------------------------------------------------------

    #[inline]
    fn blocks_slice(&self) -> &[Block] {
        self.blocks.as_slice()
    }

    /// Links free block `b` into the lists of its slot and segment kind.
    #[inline]
    fn link_free(&mut self, b: u32) {
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
    fn resize_free(&mut self, b: u32, size: usize) {
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
    fn unlink_free(&mut self, b: u32) {
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
    fn update_inactive_split(&mut self, pool: StatPool) {
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

#[cfg(test)]
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

impl Drop for Pool {
    /// Gives every segment obtained from the backing back to it. Blocks still allocated are
    /// released with it: whoever holds their addresses must not outlive the pool (the
    /// Python bindings guarantee it by keeping the pool alive while any array uses it).
    fn drop(&mut self) {
        let segs: Vec<u32> = self.segment_at.values().copied().collect();
        for s in segs {
            if let Some(seg) = self.segments[s as usize].take() {
                if seg.kind != SegmentKind::Arena {
                    // SAFETY: as in `remove_segment`: exactly the region `obtain` returned,
                    // released once; the pool is going away, so no block is handed out again.
                    unsafe { self.backing.release(seg.base, seg.size) };
                }
            }
        }
    }
}
