//! Unit and property tests of the pool, against hand-computed cases and a recount from the
//! snapshot.

use proptest::prelude::*;

use super::*;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn sim() -> Pool {
    Pool::new(Box::new(Simulated::new()), None)
}

/// Checks every public invariant from the snapshot, and the internal structures.
fn check(pool: &Pool) {
    pool.check_internal();
    let snap = pool.snapshot();
    let (mut allocated, mut active, mut reserved, mut requested) = (0u64, 0u64, 0u64, 0u64);
    let (mut n_alloc, mut n_active, mut inactive_bytes, mut inactive_n) = (0u64, 0u64, 0u64, 0u64);
    let mut last_end = 0usize;
    for seg in &snap {
        // Segments do not overlap; blocks tile their segment (so no two blocks overlap).
        assert!(seg.address >= last_end, "segments overlap");
        last_end = seg.address + seg.size;
        reserved += seg.size as u64;
        let mut at = 0;
        let whole_free = seg.blocks.len() == 1 && seg.blocks[0].state == BlockState::Free;
        for (i, b) in seg.blocks.iter().enumerate() {
            assert_eq!(b.offset, at);
            assert!(b.size > 0 && b.size % GRANULE == 0);
            at += b.size;
            match b.state {
                BlockState::Allocated => {
                    allocated += b.size as u64;
                    active += b.size as u64;
                    requested += b.requested as u64;
                    n_alloc += 1;
                    n_active += 1;
                    assert!(b.requested > 0 && b.requested <= b.size);
                }
                BlockState::Pending => {
                    active += b.size as u64;
                    n_active += 1;
                }
                BlockState::Free => {
                    if !whole_free {
                        inactive_bytes += b.size as u64;
                        inactive_n += 1;
                    }
                }
            }
            // Free neighbours are merged unless they belong to two different streams or one
            // of them sits in a free cache (it is merged when the cache is flushed).
            if b.cached {
                assert!(b.state == BlockState::Free && seg.kind == SegmentKind::Small);
                assert!(b.stream.is_some(), "cached blocks belong to a stream");
            }
            if i > 0 {
                let a = &seg.blocks[i - 1];
                if a.state == BlockState::Free
                    && b.state == BlockState::Free
                    && !a.cached
                    && !b.cached
                {
                    assert!(
                        a.stream.is_some() && b.stream.is_some() && a.stream != b.stream,
                        "unmerged free neighbours {a:?} {b:?}"
                    );
                }
            }
        }
        assert_eq!(at, seg.size);
    }
    let st = pool.stats();
    assert_eq!(st.allocated_bytes.all().current, allocated);
    assert_eq!(st.active_bytes.all().current, active);
    assert_eq!(st.reserved_bytes.all().current, reserved);
    assert_eq!(st.requested_bytes.all().current, requested);
    assert_eq!(st.allocation.all().current, n_alloc);
    assert_eq!(st.active.all().current, n_active);
    assert_eq!(st.segment.all().current, snap.len() as u64);
    assert_eq!(st.inactive_split_bytes.all().current, inactive_bytes);
    assert_eq!(st.inactive_split.all().current, inactive_n);
    for s in [
        &st.allocated_bytes,
        &st.reserved_bytes,
        &st.active_bytes,
        &st.inactive_split_bytes,
    ] {
        assert!(s.all().peak >= s.all().current);
        assert_eq!(
            s.all().current,
            s.pool(StatPool::Small).current + s.pool(StatPool::Large).current
        );
    }
}

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
fn the_limit_raises_an_oom_naming_request_allocated_reserved_and_limit() {
    let mut p = Pool::new(Box::new(Simulated::new()), Some((8 * MIB) as u64));
    let a = p.malloc(6 * MIB, 0).unwrap();
    let err = p.malloc(3 * MIB, 0).unwrap_err();
    assert_eq!(
        err,
        PoolError::LimitExceeded {
            requested: 3 * MIB,
            allocated: (6 * MIB) as u64,
            reserved: (6 * MIB) as u64,
            limit: (8 * MIB) as u64,
        }
    );
    let msg = err.to_string();
    for n in ["3145728", "6291456", "8388608"] {
        assert!(msg.contains(n), "{msg}");
    }
    assert_eq!(p.stats().num_ooms, 1);
    // A cached segment is released and the request retried before failing.
    p.free(a).unwrap();
    let policy = Policy {
        cache_ratio: f64::INFINITY,
        large_fit_slack: f64::INFINITY,
    };
    let mut q = Pool::with_policy(Box::new(Simulated::new()), Some((8 * MIB) as u64), policy);
    let a = q.malloc(6 * MIB, 0).unwrap();
    q.free(a).unwrap();
    q.malloc(9 * MIB, 0).unwrap_err(); // 10 MiB segment: over the limit even after release
    assert_eq!(q.stats().num_alloc_retries, 1);
    assert_eq!(q.stats().reserved_bytes.all().current, 0);
    let b = q.malloc(5 * MIB, 0).unwrap();
    check(&q);
    q.free(b).unwrap();
}

#[test]
fn a_backing_that_runs_out_is_an_oom_after_one_retry() {
    let policy = Policy {
        cache_ratio: f64::INFINITY,
        large_fit_slack: 0.0,
    };
    let mut p = Pool::with_policy(Box::new(Simulated::with_budget(8 * MIB)), None, policy);
    let a = p.malloc(6 * MIB, 0).unwrap();
    let err = p.malloc(4 * MIB, 0).unwrap_err();
    assert!(matches!(err, PoolError::BackingExhausted { segment, .. } if segment == 4 * MIB));
    p.free(a).unwrap();
    // The cached 6 MiB segment is given back, then the 4 MiB one fits the budget.
    let b = p.malloc(4 * MIB, 0).unwrap();
    assert_eq!(p.stats().num_alloc_retries, 1);
    assert_eq!(p.stats().num_ooms, 1);
    check(&p);
    p.free(b).unwrap();
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

#[test]
fn arenas_are_carved_and_never_freed_by_the_pool() {
    let mut p = Pool::new(Box::new(ArenasOnly), None);
    assert!(matches!(
        p.malloc(512, 0),
        Err(PoolError::BackingExhausted { .. })
    ));
    let base = 0x1000_0000 + 100; // unaligned on purpose
    p.register_arena(base, 4 * MIB).unwrap();
    let snap = p.snapshot();
    assert_eq!(snap[0].address, 0x1000_0000 + 512);
    assert_eq!(snap[0].size, 4 * MIB - 512);
    assert_eq!(snap[0].kind, SegmentKind::Arena);
    assert_eq!(
        p.register_arena(0x1000_0000 + MIB, MIB),
        Err(PoolError::ArenaOverlap {
            base: 0x1000_0000 + MIB,
            size: MIB
        })
    );
    assert!(matches!(
        p.register_arena(0x2000_0000 + 1, 600),
        Err(PoolError::ArenaTooSmall { .. })
    ));
    // Small and large requests both come from the arena.
    let a = p.malloc(1000, 0).unwrap();
    let b = p.malloc(2 * MIB, 0).unwrap();
    assert!(a >= 0x1000_0000 && b + 2 * MIB <= base + 4 * MIB);
    assert!(p.malloc(2 * MIB, 0).is_err());
    check(&p);
    assert_eq!(p.empty_cache(), 0);
    assert_eq!(
        p.unregister_arena(base),
        Err(PoolError::ArenaInUse { base, live: 2 })
    );
    p.free(a).unwrap();
    p.free(b).unwrap();
    assert_eq!(p.empty_cache(), 0, "arenas are not the pool's to free");
    p.unregister_arena(base).unwrap();
    assert_eq!(
        p.unregister_arena(base),
        Err(PoolError::UnknownArena { base })
    );
    assert_eq!(p.stats().reserved_bytes.all().current, 0);
    check(&p);
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

#[test]
fn replay_reports_peaks_and_fragmentation() {
    use TraceEvent::*;
    let trace = [
        Alloc {
            id: 1,
            size: 3 * MIB,
            stream: 0,
        },
        Alloc {
            id: 2,
            size: 1000,
            stream: 0,
        },
        Free { id: 1 },
        Alloc {
            id: 1,
            size: 3 * MIB,
            stream: 0,
        },
        Free { id: 1 },
        Free { id: 2 },
    ];
    let r = replay(&trace).unwrap();
    assert_eq!((r.allocs, r.frees), (3, 3));
    assert_eq!(r.peak_allocated, (4 * MIB + 1024) as u64);
    assert_eq!(r.peak_requested, (3 * MIB + 1000) as u64);
    assert_eq!(r.peak_reserved, (6 * MIB) as u64);
    assert_eq!(r.segments_obtained, 2);
    assert_eq!(r.final_allocated, 0);
    let f = r.fragmentation.unwrap();
    assert!((f - 6.0 / (4.0 + 1.0 / 1024.0)).abs() < 1e-12);
    assert_eq!(replay(&[]).unwrap().fragmentation, None);
}

#[test]
fn bad_traces_are_clear_errors() {
    use TraceEvent::*;
    assert_eq!(
        replay(&[Free { id: 3 }]),
        Err(PoolError::TraceUnknownId { index: 0, id: 3 })
    );
    let dup = [
        Alloc {
            id: 1,
            size: 10,
            stream: 0,
        },
        Alloc {
            id: 1,
            size: 10,
            stream: 0,
        },
    ];
    assert_eq!(
        replay(&dup),
        Err(PoolError::TraceDuplicateId { index: 1, id: 1 })
    );
    let zero = [Alloc {
        id: 1,
        size: 0,
        stream: 0,
    }];
    let err = replay(&zero).unwrap_err();
    assert_eq!(
        err.to_string(),
        "trace event 0 failed: size must be positive, got 0 bytes"
    );
    // A failed replay leaves the pool with nothing allocated.
    let mut p = sim();
    let bad = [
        Alloc {
            id: 1,
            size: 10,
            stream: 0,
        },
        Free { id: 9 },
    ];
    assert!(replay_on(&mut p, &bad).is_err());
    assert_eq!(p.stats().allocated_bytes.all().current, 0);
}

#[test]
fn random_trace_follows_the_rmm_workload() {
    let t = random_trace(10_000, KIB, 64 * MIB, 16000 * MIB, 7);
    let mut live = std::collections::HashMap::new();
    let (mut allocs, mut max_live) = (0, 0usize);
    let mut live_bytes = 0usize;
    for ev in &t {
        match *ev {
            TraceEvent::Alloc { id, size, .. } => {
                assert!((KIB..=64 * MIB).contains(&size));
                assert!(live.insert(id, size).is_none());
                live_bytes += size;
                max_live = max_live.max(live_bytes);
                allocs += 1;
            }
            TraceEvent::Free { id } => live_bytes -= live.remove(&id).unwrap(),
        }
    }
    assert_eq!(allocs, 10_000);
    assert!(live.is_empty(), "the trace ends with everything freed");
    assert!(
        max_live < 16000 * MIB && max_live > 15000 * MIB,
        "{max_live}"
    );
    assert_eq!(t, random_trace(10_000, KIB, 64 * MIB, 16000 * MIB, 7));
}

#[test]
fn the_random_trace_fragments_at_most_15_percent() {
    for seed in 0..3 {
        let t = random_trace(10_000, KIB, 64 * MIB, 16000 * MIB, seed);
        let r = replay(&t).unwrap();
        let f = r.fragmentation.unwrap();
        assert!(f <= 1.15, "seed {seed}: fragmentation {f}");
    }
}

// ---- property tests ---------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: usize, stream: u64 },
    Free { pick: usize },
    Record { pick: usize, stream: u64 },
    Sync,
    EmptyCache,
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![
        4 => 1usize..64 * KIB,
        2 => 64 * KIB..2 * MIB,
        1 => 2 * MIB..24 * MIB,
    ];
    prop_oneof![
        10 => (size, 0u64..3).prop_map(|(size, stream)| Op::Alloc { size, stream }),
        7 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 0u64..3).prop_map(|(pick, stream)| Op::Record { pick, stream }),
        1 => Just(Op::Sync),
        1 => Just(Op::EmptyCache),
    ]
}

/// A freed range a stream other than `stream` must not be handed until `synchronize()`.
struct Freed {
    start: usize,
    end: usize,
    stream: Option<u64>, // None: pending, no stream may have it
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_sequences_keep_every_invariant(ops in prop::collection::vec(op(), 1..160)) {
        let mut pool = sim();
        let mut live: Vec<(usize, usize, u64, bool)> = Vec::new(); // addr, size, stream, recorded
        let mut freed: Vec<Freed> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc { size, stream } => {
                    let a = pool.malloc(size, stream).unwrap();
                    let end = a + size;
                    for f in &freed {
                        let overlap = a < f.end && f.start < end;
                        prop_assert!(
                            !overlap || f.stream == Some(stream),
                            "stream {stream} got memory freed on {:?} before synchronize",
                            f.stream
                        );
                    }
                    for &(b, s, _, _) in &live {
                        prop_assert!(end <= b || b + s <= a, "live blocks overlap");
                    }
                    live.push((a, size, stream, false));
                }
                Op::Free { pick } if !live.is_empty() => {
                    let (a, size, stream, recorded) = live.swap_remove(pick % live.len());
                    pool.free(a).unwrap();
                    let stream = (!recorded).then_some(stream);
                    freed.push(Freed { start: a, end: a + size, stream });
                }
                Op::Record { pick, stream } if !live.is_empty() => {
                    let i = pick % live.len();
                    pool.record_stream(live[i].0, stream).unwrap();
                    if stream != live[i].2 {
                        live[i].3 = true;
                    }
                }
                Op::Sync => {
                    pool.synchronize();
                    freed.clear();
                }
                Op::EmptyCache => {
                    pool.empty_cache();
                }
                _ => {}
            }
            check(&pool);
        }
        for (a, ..) in live.drain(..) {
            pool.free(a).unwrap();
        }
        pool.synchronize();
        check(&pool);
        pool.empty_cache();
        check(&pool);
        prop_assert_eq!(pool.stats().reserved_bytes.all().current, 0);
        prop_assert_eq!(pool.stats().active_bytes.all().current, 0);
        prop_assert_eq!(pool.snapshot().len(), 0);
    }

    #[test]
    fn without_streams_everything_freed_merges_into_whole_segments(
        sizes in prop::collection::vec(1usize..3 * MIB, 1..80),
        order in prop::collection::vec(any::<usize>(), 80),
    ) {
        let mut pool = sim();
        let mut addrs: Vec<usize> = sizes.iter().map(|&s| pool.malloc(s, 0).unwrap()).collect();
        for k in order {
            if addrs.is_empty() {
                break;
            }
            let a = addrs.swap_remove(k % addrs.len());
            pool.free(a).unwrap();
            check(&pool);
        }
        for a in addrs {
            pool.free(a).unwrap();
        }
        check(&pool);
        pool.flush_caches();
        check(&pool);
        for seg in pool.snapshot() {
            prop_assert_eq!(seg.blocks.len(), 1);
        }
        prop_assert_eq!(pool.stats().inactive_split_bytes.all().current, 0);
        pool.empty_cache();
        prop_assert_eq!(pool.stats().reserved_bytes.all().current, 0);
    }
}
