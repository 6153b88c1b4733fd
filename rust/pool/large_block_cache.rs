//! A global-allocator wrapper that keeps large freed blocks for the next request of about
//! their size.
//!
//! The kernels return fresh output buffers of megabytes on every call (the MoE FFN's hidden
//! activations and their gradients, attention probabilities). glibc serves each from a new
//! `mmap`, so every page faults and is zeroed by the kernel on first touch: 7.5 % of an MoE
//! layer's forward + backward in `perf`, inside the GEMMs that first write them. Installed as
//! the extension's `#[global_allocator]`, this wrapper keeps blocks of at least `min_bytes`
//! when they are freed, up to a byte limit (the oldest go back to the system first), and hands
//! one back to a request of the same alignment and between its size and 1/8 more: a training
//! step's buffers come back warm from the second step on, as PyTorch's caching allocator does
//! for device memory. It sees only this library's Rust allocations; numpy's go to malloc.
//!
//! The bookkeeping lives in fixed arrays behind a mutex, so the allocator never allocates
//! itself, and only requests of `min_bytes` or more (rare: a few per kernel call) take it.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::{Mutex, MutexGuard};

/// How many freed blocks are kept, and how many handed-out blocks larger than their request
/// can be tracked (a request finds no cached block when that table is full).
const SLOTS: usize = 64;

#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
    align: usize,
    /// When it was freed, for evicting the oldest first.
    tick: u64,
}

struct State {
    kept: [Option<Block>; SLOTS],
    /// `(address, size it was allocated with)` of cached blocks handed out for a smaller
    /// request: `dealloc` only learns the request's size.
    lent: [Option<(usize, usize)>; SLOTS],
    kept_bytes: usize,
    limit: usize,
    tick: u64,
    hits: u64,
    misses: u64,
}

/// What the cache holds and how often it served a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    pub kept_bytes: usize,
    pub kept_blocks: usize,
    pub limit_bytes: usize,
    pub min_bytes: usize,
    pub hits: u64,
    pub misses: u64,
}

/// `inner`, with large freed blocks kept for reuse (see the module documentation).
pub struct LargeBlockCache<A> {
    inner: A,
    min_bytes: usize,
    state: Mutex<State>,
}

impl<A: GlobalAlloc> LargeBlockCache<A> {
    /// Keeps freed blocks of at least `min_bytes`, up to `limit` bytes in all.
    pub const fn new(inner: A, min_bytes: usize, limit: usize) -> Self {
        LargeBlockCache {
            inner,
            min_bytes,
            state: Mutex::new(State {
                kept: [None; SLOTS],
                lent: [None; SLOTS],
                kept_bytes: 0,
                limit,
                tick: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held, but an allocator must never panic itself.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counters and sizes, for `moecore.pool.kernel_cache_info()`.
    pub fn stats(&self) -> CacheStats {
        let s = self.state();
        CacheStats {
            kept_bytes: s.kept_bytes,
            kept_blocks: s.kept.iter().flatten().count(),
            limit_bytes: s.limit,
            min_bytes: self.min_bytes,
            hits: s.hits,
            misses: s.misses,
        }
    }

    /// Sets the byte limit (0 turns the cache off) and returns what is over it to the system.
    pub fn set_limit(&self, limit: usize) {
        let mut s = self.state();
        s.limit = limit;
        self.evict_until(&mut s, 0);
    }

    /// Returns every kept block to the system.
    pub fn release(&self) {
        let mut s = self.state();
        let limit = s.limit;
        s.limit = 0;
        self.evict_until(&mut s, 0);
        s.limit = limit;
    }

    /// Evicts the oldest kept blocks until `incoming` more bytes fit under the limit and a
    /// slot is free (or nothing is left to evict).
    fn evict_until(&self, s: &mut State, incoming: usize) {
        loop {
            let fits = s.kept_bytes + incoming <= s.limit;
            let room = incoming == 0 || s.kept.iter().any(Option::is_none);
            if fits && room {
                return;
            }
            let oldest = s
                .kept
                .iter()
                .enumerate()
                .filter_map(|(i, b)| b.map(|b| (b.tick, i)))
                .min();
            let Some((_, i)) = oldest else { return };
            let Some(b) = s.kept[i].take() else { return };
            s.kept_bytes -= b.size;
            // SAFETY: a kept block was allocated by `inner` with exactly this size and
            // alignment (see `dealloc`), and nobody else holds it.
            unsafe {
                self.inner.dealloc(
                    b.addr as *mut u8,
                    Layout::from_size_align_unchecked(b.size, b.align),
                )
            };
        }
    }

    /// A kept block for `layout`, if one fits (the smallest that does).
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        let want = layout.size();
        let most = want + want / 8;
        let mut s = self.state();
        let best = s
            .kept
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (b, i)))
            .filter(|(b, _)| b.align == layout.align() && b.size >= want && b.size <= most)
            .min_by_key(|(b, _)| b.size);
        let Some((b, i)) = best else {
            s.misses += 1;
            return None;
        };
        if b.size != want {
            let Some(slot) = s.lent.iter_mut().find(|e| e.is_none()) else {
                s.misses += 1;
                return None;
            };
            *slot = Some((b.addr, b.size));
        }
        s.kept[i] = None;
        s.kept_bytes -= b.size;
        s.hits += 1;
        Some(b.addr as *mut u8)
    }
}

// SAFETY: every block handed out comes from `inner` (directly, or kept after being freed and
// then given to one request at a time), is at least as large as the request and has its
// alignment; blocks go back to `inner` with the layout they were allocated with.
unsafe impl<A: GlobalAlloc> GlobalAlloc for LargeBlockCache<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= self.min_bytes {
            if let Some(p) = self.take(layout) {
                return p;
            }
        }
        // SAFETY: the caller's contract (non-zero size) passes through.
        unsafe { self.inner.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= self.min_bytes {
            if let Some(p) = self.take(layout) {
                // SAFETY: the block has at least `layout.size()` writable bytes.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                return p;
            }
        }
        // SAFETY: as in `alloc`.
        unsafe { self.inner.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < self.min_bytes {
            // SAFETY: small blocks always come from `inner` with this layout.
            unsafe { self.inner.dealloc(ptr, layout) };
            return;
        }
        let mut s = self.state();
        let addr = ptr as usize;
        let size = match s
            .lent
            .iter_mut()
            .find(|e| e.is_some_and(|(a, _)| a == addr))
        {
            Some(entry) => entry.take().map_or(layout.size(), |(_, size)| size),
            None => layout.size(),
        };
        let block = Block {
            addr,
            size,
            align: layout.align(),
            tick: s.tick,
        };
        s.tick += 1;
        if size <= s.limit {
            self.evict_until(&mut s, size);
            if s.kept_bytes + size <= s.limit {
                if let Some(slot) = s.kept.iter_mut().find(|b| b.is_none()) {
                    *slot = Some(block);
                    s.kept_bytes += size;
                    return;
                }
            }
        }
        drop(s);
        // SAFETY: the block was allocated by `inner` with this size (the request's, or the
        // one recorded when it was lent) and alignment.
        unsafe {
            self.inner
                .dealloc(ptr, Layout::from_size_align_unchecked(size, layout.align()))
        };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < self.min_bytes && new_size < self.min_bytes {
            // SAFETY: the caller's contract passes through; small blocks are `inner`'s own.
            return unsafe { self.inner.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the caller guarantees `new_size` with this alignment is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: non-zero size by the caller's contract.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks hold at least the smaller size and are distinct (`new` is
            // not lent out while `ptr` is live); `ptr` was allocated here with `layout`.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::System;

    const MIB: usize = 1 << 20;

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, 64).unwrap()
    }

    #[test]
    fn a_freed_large_block_serves_the_next_request_of_its_size() {
        let c = LargeBlockCache::new(System, MIB, 64 * MIB);
        // SAFETY: each block is freed once, with the layout it was allocated with.
        unsafe {
            let a = c.alloc(layout(4 * MIB));
            a.write(7);
            c.dealloc(a, layout(4 * MIB));
            assert_eq!(c.stats().kept_bytes, 4 * MIB);
            let b = c.alloc(layout(4 * MIB));
            assert_eq!(a, b, "the kept block comes back");
            let z = c.alloc_zeroed(layout(4 * MIB));
            assert_ne!(z, b, "a block is lent to one request at a time");
            c.dealloc(b, layout(4 * MIB));
            c.dealloc(z, layout(4 * MIB));
            let again = c.alloc_zeroed(layout(4 * MIB));
            assert!(
                std::slice::from_raw_parts(again, 4 * MIB)
                    .iter()
                    .all(|&x| x == 0),
                "alloc_zeroed zeroes a reused block"
            );
            c.dealloc(again, layout(4 * MIB));
            let s = c.stats();
            assert_eq!((s.hits, s.misses, s.kept_blocks), (2, 2, 2));
            c.release();
            assert_eq!(c.stats().kept_bytes, 0);
        }
    }

    #[test]
    fn a_somewhat_larger_block_is_lent_and_comes_back_whole() {
        let c = LargeBlockCache::new(System, MIB, 64 * MIB);
        // SAFETY: as above.
        unsafe {
            let a = c.alloc(layout(9 * MIB));
            c.dealloc(a, layout(9 * MIB));
            // 9 MiB is more than 7 MiB + 1/8: not lent to a 7 MiB request.
            let small = c.alloc(layout(7 * MIB));
            assert_ne!(small, a);
            assert_eq!(c.stats().hits, 0);
            c.dealloc(small, layout(7 * MIB));
            // 9 MiB is within 8 MiB + 1/8, and the 7 MiB block is too small.
            let b = c.alloc(layout(8 * MIB));
            assert_eq!(a, b);
            assert_eq!(c.stats().kept_bytes, 7 * MIB);
            c.dealloc(b, layout(8 * MIB));
            assert_eq!(c.stats().kept_bytes, 16 * MIB, "kept with its real size");
            c.release();
        }
    }

    #[test]
    fn small_requests_bypass_and_the_limit_evicts_oldest_first() {
        let c = LargeBlockCache::new(System, MIB, 10 * MIB);
        // SAFETY: as above.
        unsafe {
            let small = c.alloc(layout(1000));
            c.dealloc(small, layout(1000));
            assert_eq!(c.stats().kept_blocks, 0);
            let (a, b, d) = (
                c.alloc(layout(4 * MIB)),
                c.alloc(layout(4 * MIB)),
                c.alloc(layout(3 * MIB)),
            );
            c.dealloc(a, layout(4 * MIB));
            c.dealloc(b, layout(4 * MIB));
            c.dealloc(d, layout(3 * MIB)); // 11 MiB > 10: `a`, the oldest, goes
            let s = c.stats();
            assert_eq!((s.kept_bytes, s.kept_blocks), (7 * MIB, 2));
            let huge = c.alloc(layout(20 * MIB));
            c.dealloc(huge, layout(20 * MIB)); // above the limit: straight back
            assert_eq!(c.stats().kept_bytes, 7 * MIB);
            c.set_limit(0);
            assert_eq!(c.stats().kept_bytes, 0);
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_the_threshold() {
        let c = LargeBlockCache::new(System, MIB, 64 * MIB);
        // SAFETY: as above; each pointer is used only while it is live.
        unsafe {
            let p = c.alloc(layout(1024));
            std::ptr::write_bytes(p, 5, 1024);
            let q = c.realloc(p, layout(1024), 2 * MIB);
            assert!(std::slice::from_raw_parts(q, 1024).iter().all(|&x| x == 5));
            let r = c.realloc(q, layout(2 * MIB), 512);
            assert!(std::slice::from_raw_parts(r, 512).iter().all(|&x| x == 5));
            c.dealloc(r, layout(512));
            assert_eq!(c.stats().kept_bytes, 2 * MIB);
            c.release();
        }
    }
}
