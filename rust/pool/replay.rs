//! Replaying allocation traces, and the random workload of RMM's benchmarks.

use std::collections::HashMap;

use super::allocator::Pool;
use super::backing::Simulated;
use super::error::PoolError;

/// One event of an allocation trace. Ids name allocations; they may be reused once freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    Alloc { id: u64, size: usize, stream: u64 },
    Free { id: u64 },
}

/// What a replay measured.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayReport {
    pub allocs: u64,
    pub frees: u64,
    /// Peak of allocated bytes (block sizes, after rounding).
    pub peak_allocated: u64,
    /// Peak of the bytes the trace asked for (before rounding).
    pub peak_requested: u64,
    /// Peak of reserved bytes (segments).
    pub peak_reserved: u64,
    /// `peak_reserved / peak_allocated`: 1.0 is perfect; `None` if nothing was allocated.
    pub fragmentation: Option<f64>,
    /// Allocated bytes still live at the end of the trace.
    pub final_allocated: u64,
    /// Segments obtained from the backing over the replay.
    pub segments_obtained: u64,
}

/// Replays `events` on a fresh pool over a simulated address space (no memory is touched,
/// so traces of any size replay on any machine).
pub fn replay(events: &[TraceEvent]) -> Result<ReplayReport, PoolError> {
    let mut pool = Pool::new(Box::new(Simulated::new()), None);
    replay_on(&mut pool, events)
}

/// Replays `events` on `pool` (its peak statistics are reset first). Frees what the trace
/// left allocated only if it fails midway, so a failed replay leaves the pool as it was.
pub fn replay_on(pool: &mut Pool, events: &[TraceEvent]) -> Result<ReplayReport, PoolError> {
    pool.reset_peak_stats();
    let start_obtained = pool.stats().num_device_alloc;
    let mut live: HashMap<u64, usize> = HashMap::new();
    let mut report = ReplayReport {
        allocs: 0,
        frees: 0,
        peak_allocated: 0,
        peak_requested: 0,
        peak_reserved: 0,
        fragmentation: None,
        final_allocated: 0,
        segments_obtained: 0,
    };
    let result = run(pool, events, &mut live, &mut report);
    if result.is_err() {
        for (_, addr) in live.drain() {
            // These addresses were returned by this pool just above and not freed yet.
            let _ = pool.free(addr);
        }
    }
    result?;
    let st = pool.stats();
    report.peak_allocated = st.allocated_bytes.all().peak;
    report.peak_requested = st.requested_bytes.all().peak;
    report.peak_reserved = st.reserved_bytes.all().peak;
    report.final_allocated = st.allocated_bytes.all().current;
    report.segments_obtained = st.num_device_alloc - start_obtained;
    report.fragmentation = (report.peak_allocated > 0)
        .then(|| report.peak_reserved as f64 / report.peak_allocated as f64);
    Ok(report)
}

fn run(
    pool: &mut Pool,
    events: &[TraceEvent],
    live: &mut HashMap<u64, usize>,
    report: &mut ReplayReport,
) -> Result<(), PoolError> {
    for (index, ev) in events.iter().enumerate() {
        let failed = |source: PoolError| PoolError::TraceEventFailed {
            index,
            source: Box::new(source),
        };
        match *ev {
            TraceEvent::Alloc { id, size, stream } => {
                if live.contains_key(&id) {
                    return Err(PoolError::TraceDuplicateId { index, id });
                }
                let addr = pool.malloc(size, stream).map_err(failed)?;
                live.insert(id, addr);
                report.allocs += 1;
            }
            TraceEvent::Free { id } => {
                let addr = live
                    .remove(&id)
                    .ok_or(PoolError::TraceUnknownId { index, id })?;
                pool.free(addr).map_err(failed)?;
                report.frees += 1;
            }
        }
    }
    Ok(())
}

/// A small, fast, seedable generator (SplitMix64) for reproducible workloads.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (the tiny modulo bias is irrelevant for workloads).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// RMM's random-allocation workload: `2 × n_allocations` steps; each step draws a size
/// uniformly in `min_size..=max_size` and allocates it with probability 73 % (if fewer than
/// `n_allocations` were made and the live bytes stay under `max_live_bytes`), otherwise frees
/// a uniformly chosen live allocation. What is still live at the end is freed, so the trace
/// ends with nothing allocated. All on stream 0.
pub fn random_trace(
    n_allocations: usize,
    min_size: usize,
    max_size: usize,
    max_live_bytes: usize,
    seed: u64,
) -> Vec<TraceEvent> {
    let mut rng = SplitMix64::new(seed);
    let (lo, hi) = (min_size.max(1) as u64, max_size.max(min_size.max(1)) as u64);
    let mut events = Vec::with_capacity(n_allocations * 2);
    let mut live: Vec<(u64, usize)> = Vec::new();
    let mut live_bytes = 0usize;
    let mut made = 0usize;
    for _ in 0..n_allocations * 2 {
        let size = rng.range(lo, hi) as usize;
        let alloc = live.is_empty()
            || (rng.range(0, 99) < 73
                && made < n_allocations
                && live_bytes + size < max_live_bytes);
        if alloc && made < n_allocations {
            let id = made as u64;
            events.push(TraceEvent::Alloc {
                id,
                size,
                stream: 0,
            });
            live.push((id, size));
            live_bytes += size;
            made += 1;
        } else if !live.is_empty() {
            let i = rng.range(0, live.len() as u64 - 1) as usize;
            let (id, size) = live.swap_remove(i);
            events.push(TraceEvent::Free { id });
            live_bytes -= size;
        }
    }
    for (id, _) in live {
        events.push(TraceEvent::Free { id });
    }
    events
}

#[cfg(test)]
mod tests {
    use super::super::tests::{sim, KIB, MIB};
    use crate::pool::*;

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
}
