//! A hash map from block address to block index with a hasher made for addresses.
//!
//! Addresses are multiples of 512, so their low bits carry nothing and std's SipHash is
//! needlessly slow here (the map is on the path of every `malloc` and `free`). A folded
//! 64×64→128-bit multiply spreads every input bit over the whole hash in one instruction.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes one `usize` (an address) by a folded multiply.
#[derive(Default, Clone, Copy)]
pub struct AddrHasher(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for AddrHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write_usize(&mut self, x: usize) {
        let m = u128::from((x as u64) ^ self.0).wrapping_mul(u128::from(K));
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_usize(usize::from(b));
        }
    }
}

/// Address → block index.
pub type AddrMap = HashMap<usize, u32, BuildHasherDefault<AddrHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn aligned_addresses_spread_over_buckets() {
        // 4096 addresses 512 B apart must land in many distinct low-bit buckets.
        let build = BuildHasherDefault::<AddrHasher>::default();
        let mut buckets = std::collections::HashSet::new();
        for i in 0..4096usize {
            buckets.insert(build.hash_one(0x7f00_0000_0000 + i * 512) & 4095);
        }
        assert!(buckets.len() > 2000, "only {} buckets used", buckets.len());
    }
}
