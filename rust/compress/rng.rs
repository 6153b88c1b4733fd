//! Counter-based randomness: a value depends only on (seed, position), so parallel code and
//! repeated runs draw the same numbers.

/// SplitMix64's finaliser: a bijective 64-bit mix with good avalanche.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) for position `i` of the stream named by `seed` (24 random bits,
/// exactly representable in f32). Only 32-bit operations (MurmurHash3's finaliser over the
/// position and the folded seed), so loops over positions vectorise.
#[inline]
pub(crate) fn uniform(seed: u64, i: u64) -> f32 {
    let folded = (seed as u32) ^ ((seed >> 32) as u32).rotate_left(16);
    let mut x = (i as u32).wrapping_mul(0x9E37_79B9) ^ folded ^ ((i >> 32) as u32);
    x ^= x >> 16;
    x = x.wrapping_mul(0x85EB_CA6B);
    x ^= x >> 13;
    x = x.wrapping_mul(0xC2B2_AE35);
    x ^= x >> 16;
    (x >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_range_and_roughly_uniform() {
        let n = 100_000u64;
        let draws: Vec<f32> = (0..n).map(|i| uniform(7, i)).collect();
        assert!(draws.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mean = draws.iter().map(|&u| f64::from(u)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let below_tenth = draws.iter().filter(|&&u| u < 0.1).count();
        assert!((9_000..11_000).contains(&below_tenth), "{below_tenth}");
        assert_ne!(uniform(7, 3), uniform(8, 3), "seed must matter");
    }
}
