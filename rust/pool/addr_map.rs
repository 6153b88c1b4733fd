//! Address → block index, for the live blocks: a small open-addressing hash table.
//!
//! Every `malloc` inserts and every `free` removes one entry, so this sits on the hot path.
//! Keys are block addresses: multiples of 512, never 0 or 1, unique among live blocks (the
//! allocator never hands out an address twice while it is live). That allows a plain
//! linear-probing table with two reserved keys (0 = empty, 1 = deleted) and Fibonacci hashing
//! of the granule number, about a third of the instructions of a general-purpose map.

const EMPTY: usize = 0;
const DELETED: usize = 1;
/// Fibonacci hashing multiplier (2^64 / golden ratio).
const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// Address → block index.
#[derive(Debug, Clone)]
pub struct AddrMap {
    keys: Vec<usize>,
    values: Vec<u32>,
    /// log2 of the capacity.
    bits: u32,
    len: usize,
    deleted: usize,
}

impl Default for AddrMap {
    fn default() -> Self {
        Self::with_bits(6)
    }
}

impl AddrMap {
    fn with_bits(bits: u32) -> Self {
        Self {
            keys: vec![EMPTY; 1 << bits],
            values: vec![0; 1 << bits],
            bits,
            len: 0,
            deleted: 0,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, key: usize) -> usize {
        (((key as u64) >> 9).wrapping_mul(K) >> (64 - self.bits)) as usize
    }

    /// The slot holding `key`, if any.
    #[inline]
    fn find(&self, key: usize) -> Option<usize> {
        debug_assert!(key > DELETED);
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        loop {
            let k = self.keys[i];
            if k == key {
                return Some(i);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// The index stored for `key`.
    #[inline]
    pub fn get(&self, key: &usize) -> Option<&u32> {
        self.find(*key).map(|i| &self.values[i])
    }

    /// Stores `value` for `key`, which must not be present (live addresses are unique).
    #[inline]
    pub fn insert(&mut self, key: usize, value: u32) {
        debug_assert!(key > DELETED && self.find(key).is_none());
        if (self.len + self.deleted + 1) * 4 > self.keys.len() * 3 {
            self.rehash();
        }
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        loop {
            let k = self.keys[i];
            if k == EMPTY || k == DELETED {
                if k == DELETED {
                    self.deleted -= 1;
                }
                self.keys[i] = key;
                self.values[i] = value;
                self.len += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Removes `key`, returning its value.
    #[inline]
    pub fn remove(&mut self, key: &usize) -> Option<u32> {
        let i = self.find(*key)?;
        self.keys[i] = DELETED;
        self.len -= 1;
        self.deleted += 1;
        Some(self.values[i])
    }

    /// Rebuilds the table without deleted slots, doubling it if it is half full.
    #[cold]
    fn rehash(&mut self) {
        let bits = if (self.len + 1) * 2 > self.keys.len() {
            self.bits + 1
        } else {
            self.bits
        };
        let mut fresh = Self::with_bits(bits);
        for (&k, &v) in self.keys.iter().zip(&self.values) {
            if k > DELETED {
                fresh.insert(k, v);
            }
        }
        *self = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn behaves_like_a_hash_map_under_churn() {
        let mut m = AddrMap::default();
        let mut reference = HashMap::new();
        let mut x = 12345u64;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = 0x7f00_0000_0000 + ((x % 5000) as usize) * 512;
            match reference.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    assert_eq!(m.remove(&key), Some(e.remove()));
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    m.insert(key, step);
                    e.insert(step);
                }
            }
            assert_eq!(m.len(), reference.len());
        }
        for (k, v) in &reference {
            assert_eq!(m.get(k), Some(v));
        }
        assert_eq!(m.get(&(0x7f00_0000_0000 + 5001 * 512)), None);
        assert_eq!(m.remove(&(0x7f00_0000_0000 + 5001 * 512)), None);
    }
}
