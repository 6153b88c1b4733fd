//! Allocator statistics with the names users know from `torch.cuda.memory_stats()`.
//!
//! Each statistic is kept for three pools, as PyTorch does: `all`, `small_pool` (blocks of
//! small segments) and `large_pool` (blocks of large segments and registered arenas), and for
//! each of them `current`, `peak` (since the last `reset_peak_stats`), `allocated` (sum of
//! increases) and `freed` (sum of decreases). The flat key of one value is
//! `"<stat>.<pool>.<field>"`, e.g. `"allocated_bytes.all.current"`.

/// One statistic of one pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    pub current: u64,
    pub peak: u64,
    pub allocated: u64,
    pub freed: u64,
}

impl Stat {
    #[inline]
    fn add(&mut self, n: u64) {
        self.current += n;
        self.allocated += n;
        self.peak = self.peak.max(self.current);
    }

    #[inline]
    fn sub(&mut self, n: u64) {
        self.current -= n;
        self.freed += n;
    }
}

/// Which pool a block or segment counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatPool {
    Small = 1,
    Large = 2,
}

/// One statistic for `all`, `small_pool` and `large_pool`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatArray(pub [Stat; 3]);

impl StatArray {
    /// The `all` entry.
    pub fn all(&self) -> &Stat {
        &self.0[0]
    }

    /// The entry of one pool.
    pub fn pool(&self, pool: StatPool) -> &Stat {
        &self.0[pool as usize]
    }

    #[inline]
    pub(crate) fn add(&mut self, pool: StatPool, n: u64) {
        self.0[0].add(n);
        self.0[pool as usize].add(n);
    }

    #[inline]
    pub(crate) fn sub(&mut self, pool: StatPool, n: u64) {
        self.0[0].sub(n);
        self.0[pool as usize].sub(n);
    }

    /// Sets the current value of one pool (`all` moves by the same amount).
    #[inline]
    pub(crate) fn set(&mut self, pool: StatPool, n: u64) {
        let cur = self.0[pool as usize].current;
        if n >= cur {
            self.add(pool, n - cur);
        } else {
            self.sub(pool, cur - n);
        }
    }

    fn reset_peak(&mut self) {
        for s in &mut self.0 {
            s.peak = s.current;
        }
    }
}

/// Every statistic of a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Number of allocated blocks.
    pub allocation: StatArray,
    /// Number of segments (reserved regions).
    pub segment: StatArray,
    /// Number of active blocks: allocated, or freed but pending on other streams.
    pub active: StatArray,
    /// Number of free blocks inside segments that are not wholly free (unreleasable).
    pub inactive_split: StatArray,
    /// Bytes of allocated blocks (rounded sizes).
    pub allocated_bytes: StatArray,
    /// Bytes of all segments.
    pub reserved_bytes: StatArray,
    /// Bytes of active blocks.
    pub active_bytes: StatArray,
    /// Bytes of free blocks inside segments that are not wholly free: the fragmentation
    /// `empty_cache()` cannot return.
    pub inactive_split_bytes: StatArray,
    /// Bytes the callers asked for (before rounding) of allocated blocks.
    pub requested_bytes: StatArray,
    /// Times a request released cached segments and tried again.
    pub num_alloc_retries: u64,
    /// Requests that failed for lack of memory (limit or backing).
    pub num_ooms: u64,
    /// Calls to `synchronize()`.
    pub num_sync_all_streams: u64,
    /// Segments obtained from the backing.
    pub num_device_alloc: u64,
    /// Segments given back to the backing.
    pub num_device_free: u64,
}

const POOL_NAMES: [&str; 3] = ["all", "small_pool", "large_pool"];
const FIELD_NAMES: [&str; 4] = ["current", "peak", "allocated", "freed"];

impl Stats {
    /// Sets every peak to the current value.
    pub fn reset_peak(&mut self) {
        for a in self.arrays_mut() {
            a.reset_peak();
        }
    }

    fn arrays(&self) -> [(&'static str, &StatArray); 9] {
        [
            ("allocation", &self.allocation),
            ("segment", &self.segment),
            ("active", &self.active),
            ("inactive_split", &self.inactive_split),
            ("allocated_bytes", &self.allocated_bytes),
            ("reserved_bytes", &self.reserved_bytes),
            ("active_bytes", &self.active_bytes),
            ("inactive_split_bytes", &self.inactive_split_bytes),
            ("requested_bytes", &self.requested_bytes),
        ]
    }

    fn arrays_mut(&mut self) -> [&mut StatArray; 9] {
        [
            &mut self.allocation,
            &mut self.segment,
            &mut self.active,
            &mut self.inactive_split,
            &mut self.allocated_bytes,
            &mut self.reserved_bytes,
            &mut self.active_bytes,
            &mut self.inactive_split_bytes,
            &mut self.requested_bytes,
        ]
    }

    /// Every value under its flat `torch.cuda.memory_stats()` key, sorted by key.
    pub fn to_flat(&self) -> Vec<(String, u64)> {
        let mut out = Vec::with_capacity(9 * 12 + 5);
        for (name, arr) in self.arrays() {
            for (pool, stat) in POOL_NAMES.iter().zip(arr.0.iter()) {
                let values = [stat.current, stat.peak, stat.allocated, stat.freed];
                for (field, v) in FIELD_NAMES.iter().zip(values) {
                    out.push((format!("{name}.{pool}.{field}"), v));
                }
            }
        }
        out.push(("num_alloc_retries".into(), self.num_alloc_retries));
        out.push(("num_ooms".into(), self.num_ooms));
        out.push(("num_sync_all_streams".into(), self.num_sync_all_streams));
        out.push(("num_device_alloc".into(), self.num_device_alloc));
        out.push(("num_device_free".into(), self.num_device_free));
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_arrays_track_current_peak_and_totals() {
        let mut a = StatArray::default();
        a.add(StatPool::Small, 10);
        a.add(StatPool::Large, 5);
        a.sub(StatPool::Small, 4);
        assert_eq!(a.all().current, 11);
        assert_eq!(a.all().peak, 15);
        assert_eq!(a.all().allocated, 15);
        assert_eq!(a.all().freed, 4);
        assert_eq!(a.pool(StatPool::Small).current, 6);
        assert_eq!(a.pool(StatPool::Small).peak, 10);
        a.set(StatPool::Large, 2);
        assert_eq!(a.all().current, 8);
        assert_eq!(a.pool(StatPool::Large).freed, 3);
        a.reset_peak();
        assert_eq!(a.all().peak, 8);
    }

    #[test]
    fn flat_keys_follow_torch_names() {
        let s = Stats::default();
        let flat = s.to_flat();
        assert_eq!(flat.len(), 9 * 3 * 4 + 5);
        let keys: Vec<&str> = flat.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"allocated_bytes.all.current"));
        assert!(keys.contains(&"reserved_bytes.large_pool.peak"));
        assert!(keys.contains(&"inactive_split_bytes.small_pool.freed"));
        assert!(keys.contains(&"num_ooms"));
    }
}
