//! The size rules of the pool: the 512 B granule, small vs large requests, segment sizes.

/// Every block size and every block offset inside a segment is a multiple of this.
pub const GRANULE: usize = 512;
/// Requests up to this size (after rounding) are "small" and come from shared small segments.
pub const SMALL_MAX: usize = 1 << 20;
/// Small segments have exactly this size; large segments are rounded up to a multiple of it.
pub const SEGMENT_ROUND: usize = 2 << 20;
/// A free remainder of a large block is split off only when it is larger than this, as in
/// PyTorch's caching allocator: tiny tails of large blocks would only fragment the index.
pub const LARGE_SPLIT_MIN: usize = SMALL_MAX;

/// Rounds `n` up to a multiple of `to` (a power of two); `None` on overflow.
#[inline]
pub fn round_up(n: usize, to: usize) -> Option<usize> {
    debug_assert!(to.is_power_of_two());
    Some(n.checked_add(to - 1)? & !(to - 1))
}

/// Rounds `n` down to a multiple of `to` (a power of two).
#[inline]
pub fn round_down(n: usize, to: usize) -> usize {
    debug_assert!(to.is_power_of_two());
    n & !(to - 1)
}

/// Whether a rounded request is served from the small pool.
#[inline]
pub fn is_small(rounded: usize) -> bool {
    rounded <= SMALL_MAX
}

/// The size of the segment a new request of `rounded` bytes gets from the backing.
#[inline]
pub fn segment_size_for(rounded: usize) -> Option<usize> {
    if is_small(rounded) {
        Some(SEGMENT_ROUND)
    } else {
        round_up(rounded, SEGMENT_ROUND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_follows_the_granule_and_segment_rules() {
        assert_eq!(round_up(1, GRANULE), Some(512));
        assert_eq!(round_up(512, GRANULE), Some(512));
        assert_eq!(round_up(513, GRANULE), Some(1024));
        assert_eq!(round_up(usize::MAX, GRANULE), None);
        assert_eq!(round_down(1023, GRANULE), 512);
        assert!(is_small(1 << 20));
        assert!(!is_small((1 << 20) + 512));
        assert_eq!(segment_size_for(512), Some(2 << 20));
        assert_eq!(segment_size_for((1 << 20) + 512), Some(2 << 20));
        assert_eq!(segment_size_for((2 << 20) + 512), Some(4 << 20));
        assert_eq!(segment_size_for(usize::MAX - 511), None);
    }
}
