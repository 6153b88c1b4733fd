//! Obtaining a new segment when no free block fits: the cache-ratio policy, the byte limit,
//! one retry after emptying the cache, then an out-of-memory error.

use super::super::error::PoolError;
use super::super::size::segment_size_for;
use super::segment::SegmentKind;
use super::Pool;

impl Pool {
    /// Obtains a new segment for a request that no free block fits; returns its (free,
    /// linked) block.
    pub(super) fn grow(
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
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{check, MIB};
    use crate::pool::*;

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
}
