//! Runs a hot elementwise loop compiled for the widest vector instructions this CPU has.
//!
//! The crate is built for baseline x86-64 (SSE2) so one wheel runs everywhere; LLVM then
//! vectorises plain loops four lanes wide at most. Wrapping a loop in [`vectorized`] compiles
//! a copy of it (the closure is inlined into a `#[target_feature]` function) for AVX-512 and
//! for AVX2 + FMA, and picks one at run time. The loops stay ordinary safe Rust.

/// The instruction sets [`vectorized`] chooses between (`crate::cpu` decides which runs).
pub(crate) use crate::cpu::Level;

/// The level [`vectorized`] runs: the CPU's widest, capped by `MOECORE_CPU_LEVEL`.
pub(crate) fn level() -> Level {
    crate::cpu::level()
}

/// `f()`, compiled for [`level()`]. Pass `f` as `#[inline(always)] || { … }`: `f` is called
/// in three places (one per level), and LLVM otherwise may keep a larger closure out of line,
/// compiled for the baseline — the softmax, LayerNorm and dS loops silently ran SSE code so.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    vectorized_at(level(), f)
}

/// `f()` compiled for `level`, or for the baseline if this CPU lacks `level` (so tests can
/// run every path the CPU has, whatever `MOECORE_CPU_LEVEL` says).
#[inline(always)]
pub(crate) fn vectorized_at<R>(level: Level, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        let have = crate::cpu::native_level();
        match level {
            // SAFETY: `have` is what the CPU supports; these functions are only entered when
            // it includes every feature they enable.
            Level::Avx512 if have == Level::Avx512 => return unsafe { avx512(f) },
            Level::Avx2 if have != Level::Baseline => return unsafe { avx2(f) },
            _ => {}
        }
    }
    let _ = level;
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::fastmath::tanh;

    fn tanh_all(level: Level, x: &[f32]) -> Vec<f32> {
        vectorized_at(level, || x.iter().map(|&v| tanh(v)).collect())
    }

    #[test]
    fn every_level_computes_the_same_values() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let want: Vec<f64> = x.iter().map(|&v| f64::from(v).tanh()).collect();
        for level in [Level::Avx512, Level::Avx2, Level::Baseline] {
            let got = tanh_all(level, &x);
            for (g, w) in got.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() < 1e-6, "{level:?}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn level_is_stable() {
        assert_eq!(level(), level());
    }
}
