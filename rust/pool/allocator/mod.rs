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
//!
//! # Files
//! `Pool`'s fields and constructors are here; its methods are split by concern, one
//! `impl Pool` block per file: `malloc` (taking a block for a request), `grow` (new segments,
//! the byte limit, out-of-memory errors), `free` (freeing, merging, telling a double or
//! foreign free apart), `streams` (stream slots, `record_stream`, `synchronize`, the free
//! caches), `segments` (the segment table, giving segments back), `arenas` (registered
//! regions), `free_lists` (the TLSF lists and the free-space counters behind
//! `inactive_split`), `snapshot` (the picture of segments and blocks). `segment` says what a
//! segment is. The files call each other's methods on `Pool` (one type split by concern) but
//! import nothing from each other: each imports from this file and `segment`, and this file
//! imports only `segment`, so the `use` dependencies go one way.

mod arenas;
#[cfg(test)]
mod check;
mod free;
mod free_lists;
mod grow;
mod malloc;
pub(super) mod segment;
mod segments;
pub(super) mod snapshot;
mod streams;

use std::collections::BTreeMap;

use super::addr_map::AddrMap;
use super::backing::{Backing, HostBacking};
use super::block::BlockSlab;
use super::free_cache::FreeCache;
use super::size::GRANULE;
use super::stats::Stats;
use super::tlsf::Tlsf;
use segment::{Segment, SegmentKind};

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

#[cfg(test)]
mod tests {
    use super::super::tests::{sim, KIB, MIB};
    use crate::pool::*;

    #[test]
    fn host_blocks_are_real_aligned_disjoint_memory() {
        let mut p = Pool::host(None);
        let sizes = [512, 1000, 4096, 100_000, 3 * MIB];
        let addrs: Vec<usize> = sizes.iter().map(|&s| p.malloc(s, 0).unwrap()).collect();
        for (k, (&a, &s)) in addrs.iter().zip(&sizes).enumerate() {
            assert_eq!(a % 512, 0);
            // SAFETY: `a` is a live block of at least `s` bytes of host memory from this pool.
            unsafe { std::ptr::write_bytes(a as *mut u8, k as u8 + 1, s) };
        }
        for (k, (&a, &s)) in addrs.iter().zip(&sizes).enumerate() {
            // SAFETY: as above; nothing else wrote to these blocks, so each must still hold its
            // own fill byte if no two blocks overlap.
            let bytes = unsafe { std::slice::from_raw_parts(a as *const u8, s) };
            assert!(bytes.iter().all(|&x| x == k as u8 + 1));
        }
        for a in addrs {
            p.free(a).unwrap();
        }
    }

    #[test]
    fn reset_peak_stats_brings_peaks_down_to_current() {
        let mut p = sim();
        let a = p.malloc(5 * MIB, 0).unwrap();
        let b = p.malloc(KIB, 0).unwrap();
        p.free(a).unwrap();
        assert_eq!(p.stats().allocated_bytes.all().peak, (6 * MIB + KIB) as u64);
        p.reset_peak_stats();
        assert_eq!(p.stats().allocated_bytes.all().peak, KIB as u64);
        assert_eq!(p.stats().allocation.all().allocated, 2);
        assert_eq!(p.stats().allocation.all().freed, 1);
        p.free(b).unwrap();
    }
}
