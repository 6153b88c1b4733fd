//! What the CPU we run on can do, detected at run time, and the one place that decides which
//! of moecore's kernel paths runs (used by `moecore info` and by every kernel that picks a
//! vectorised path).
//!
//! The kernel level is the widest this CPU supports, capped by the environment variable
//! [`LEVEL_ENV`] (`MOECORE_CPU_LEVEL=avx512|avx2|baseline`), read once. The cap lets the AVX2
//! and the portable paths be measured and tested on a machine with AVX-512. It governs the
//! kernels written in this crate; the `gemm` crate behind `linalg::gemm` detects the CPU on
//! its own (`gemm-common`'s `feature_detected!`) and always uses the widest it finds.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that caps the kernel level.
pub const LEVEL_ENV: &str = "MOECORE_CPU_LEVEL";

/// The instruction-set levels moecore's kernels are built for, narrowest first (so `min` caps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Portable Rust, compiled for baseline x86-64 (or whatever the target is).
    Baseline,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 F, VL and DQ with AVX2 and FMA.
    Avx512,
}

impl Level {
    /// The name [`LEVEL_ENV`] takes and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// Parses a [`LEVEL_ENV`] value (case and surrounding blanks ignored).
    pub fn parse(value: &str) -> Result<Level, LevelError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "baseline" => Ok(Level::Baseline),
            "avx2" => Ok(Level::Avx2),
            "avx512" => Ok(Level::Avx512),
            _ => Err(LevelError {
                value: value.to_owned(),
            }),
        }
    }
}

/// A [`LEVEL_ENV`] value that names no level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelError {
    /// The value as it was set.
    pub value: String,
}

impl fmt::Display for LevelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{LEVEL_ENV}={:?} is not a kernel level: use avx512, avx2 or baseline \
             (or unset it for the widest this CPU supports)",
            self.value
        )
    }
}

impl std::error::Error for LevelError {}

/// The widest level this CPU supports: AVX-512 needs F, VL and DQ besides AVX2 + FMA (what
/// `linalg::simd` enables), AVX2 needs FMA.
pub fn native_level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if avx2
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
        {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// The cap [`LEVEL_ENV`] sets: `Ok(None)` when it is unset or empty, an error when it names
/// no level. Read once, at the first call (the Python extension calls it at import and
/// raises on the error).
pub fn requested_level() -> Result<Option<Level>, LevelError> {
    static REQUESTED: OnceLock<Result<Option<Level>, LevelError>> = OnceLock::new();
    REQUESTED
        .get_or_init(|| match std::env::var(LEVEL_ENV) {
            Ok(v) if !v.trim().is_empty() => Level::parse(&v).map(Some),
            _ => Ok(None),
        })
        .clone()
}

/// The level every kernel of this crate dispatches on: [`native_level`] capped by
/// [`requested_level`]. A value that names no level caps nothing here (the Python extension
/// refuses to load with it, so only pure-Rust users can reach this with one).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match requested_level() {
        Ok(Some(cap)) => native_level().min(cap),
        _ => native_level(),
    })
}

/// Whether kernels of `wanted` may run: this CPU has it and [`LEVEL_ENV`] allows it.
pub fn allows(wanted: Level) -> bool {
    level() >= wanted
}

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
    fn levels_parse_by_name_and_refuse_anything_else() {
        for level in [Level::Baseline, Level::Avx2, Level::Avx512] {
            assert_eq!(Level::parse(level.name()), Ok(level));
        }
        assert_eq!(Level::parse(" AVX2\n"), Ok(Level::Avx2));
        let err = Level::parse("sse").unwrap_err();
        assert!(
            err.to_string().contains("MOECORE_CPU_LEVEL=\"sse\""),
            "{err}"
        );
        assert!(
            err.to_string().contains("avx512, avx2 or baseline"),
            "{err}"
        );
    }

    #[test]
    fn the_level_in_force_is_native_capped_by_the_request() {
        assert!(level() <= native_level());
        match requested_level() {
            Ok(Some(cap)) => assert_eq!(level(), native_level().min(cap)),
            _ => assert_eq!(level(), native_level()),
        }
        assert!(allows(Level::Baseline));
        assert_eq!(allows(Level::Avx2), level() >= Level::Avx2);
    }

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
