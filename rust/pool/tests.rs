//! The pool's property tests, and the helpers every test of the pool uses: `check` recounts
//! every public invariant from the snapshot. The hand-computed cases sit beside the code
//! they test (`allocator/*.rs`, `replay.rs`).

use proptest::prelude::*;

use super::*;

pub(super) const KIB: usize = 1 << 10;
pub(super) const MIB: usize = 1 << 20;

pub(super) fn sim() -> Pool {
    Pool::new(Box::new(Simulated::new()), None)
}

/// Checks every public invariant from the snapshot, and the internal structures.
pub(super) fn check(pool: &Pool) {
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
