//! What the CPU we run on can do, detected at run time (used by `moecore info` and by the
//! kernels that pick a vectorised path).

/// The SIMD features of this CPU that moecore's kernels care about, by their usual names.
pub fn simd_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {
                $(if std::is_x86_feature_detected!($name) { found.push($name); })*
            };
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            found.push("neon");
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_are_unique_and_known() {
        let f = simd_features();
        let mut sorted = f.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), f.len());
        #[cfg(target_arch = "x86_64")]
        assert!(
            f.contains(&"sse4.2"),
            "every x86-64 machine we support has SSE4.2: {f:?}"
        );
    }
}
