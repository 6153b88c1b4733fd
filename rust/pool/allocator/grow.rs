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
