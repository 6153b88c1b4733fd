//! Dense all-reduce or compressed all-gather, per bucket, from the bytes each moves.

use super::CommError;

/// How a bucket travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Sum by all-reduce, then scale by 1/P.
    AllReduce,
    /// Top-k compress (with error feedback), all-gather the payloads, sum them decoded.
    CompressedAllGather,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::AllReduce => "allreduce",
            Transport::CompressedAllGather => "allgather",
        }
    }
}

/// When compression is used (once past the warm-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressWhen {
    /// Only where the compressed all-gather moves fewer bytes than the all-reduce.
    Auto,
    /// Every bucket (for tests and experiments; e.g. ratio 1.0 must equal dense).
    Always,
}

/// Top-k compression settings the scheduler decides with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompressPlan {
    /// Fraction of elements sent, in (0, 1].
    pub ratio: f64,
    /// Steps sent dense before compression starts.
    pub warmup_steps: u64,
    pub when: CompressWhen,
}

impl CompressPlan {
    pub fn check(&self) -> Result<(), CommError> {
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(CommError::BadConfig(format!(
                "compression ratio must be in (0, 1], got {}",
                self.ratio
            )));
        }
        Ok(())
    }
}

/// Elements top-k sends out of `n`: `max(1, floor(ratio·n + 1/2))`, at most n (as
/// `moecore.compress.TopK.k_for`).
pub fn topk_k(n: usize, ratio: f64) -> usize {
    if n == 0 {
        return 0;
    }
    ((ratio * n as f64 + 0.5).floor() as usize).clamp(1, n)
}

/// Bytes a ring all-reduce sends per rank: `2·(P−1)/P · n · elem_bytes`.
pub fn allreduce_bytes(n: usize, elem_bytes: usize, world: usize) -> f64 {
    if world <= 1 {
        return 0.0;
    }
    2.0 * (world - 1) as f64 / world as f64 * (n * elem_bytes) as f64
}

/// Bytes an all-gather of top-k payloads receives per rank: `(P−1) · k · 8` (a 4-byte index
/// and a 4-byte value per entry; the 44-byte header is ignored).
pub fn allgather_bytes(n: usize, world: usize, ratio: f64) -> f64 {
    if world <= 1 {
        return 0.0;
    }
    (world - 1) as f64 * topk_k(n, ratio) as f64 * 8.0
}

/// The transport of a bucket of `n` elements at `step`, identical on every rank.
pub fn choose_transport(
    n: usize,
    elem_bytes: usize,
    world: usize,
    step: u64,
    compress: Option<&CompressPlan>,
) -> Transport {
    let Some(c) = compress else {
        return Transport::AllReduce;
    };
    // Only float32 buckets can be compressed (the compressor's input type).
    if world <= 1 || step < c.warmup_steps || elem_bytes != 4 {
        return Transport::AllReduce;
    }
    match c.when {
        CompressWhen::Always => Transport::CompressedAllGather,
        CompressWhen::Auto if allgather_bytes(n, world, c.ratio) < allreduce_bytes(n, 4, world) => {
            Transport::CompressedAllGather
        }
        CompressWhen::Auto => Transport::AllReduce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(ratio: f64, when: CompressWhen) -> CompressPlan {
        CompressPlan {
            ratio,
            warmup_steps: 2,
            when,
        }
    }

    #[test]
    fn byte_counts_by_hand() {
        assert_eq!(allreduce_bytes(1000, 4, 2), 4000.0);
        assert_eq!(allreduce_bytes(1000, 4, 4), 6000.0);
        assert_eq!(allgather_bytes(1000, 4, 0.01), 3.0 * 10.0 * 8.0);
        assert_eq!(topk_k(1000, 0.0001), 1);
        assert_eq!(topk_k(10, 1.0), 10);
        assert_eq!(topk_k(0, 0.5), 0);
    }

    #[test]
    fn warmup_then_cheaper_one() {
        let c = plan(0.01, CompressWhen::Auto);
        assert_eq!(
            choose_transport(1 << 20, 4, 8, 1, Some(&c)),
            Transport::AllReduce
        );
        assert_eq!(
            choose_transport(1 << 20, 4, 8, 2, Some(&c)),
            Transport::CompressedAllGather
        );
        // 0.5 density: (P−1)·k·8 = 7·n/2·8 = 28n > 2·7/8·4n = 7n: dense wins.
        let half = plan(0.5, CompressWhen::Auto);
        assert_eq!(
            choose_transport(1 << 20, 4, 8, 5, Some(&half)),
            Transport::AllReduce
        );
        let always = plan(1.0, CompressWhen::Always);
        assert_eq!(
            choose_transport(10, 4, 2, 5, Some(&always)),
            Transport::CompressedAllGather
        );
        assert_eq!(
            choose_transport(10, 4, 1, 5, Some(&always)),
            Transport::AllReduce
        );
        assert_eq!(
            choose_transport(10, 2, 2, 5, Some(&always)),
            Transport::AllReduce
        );
        assert_eq!(choose_transport(10, 4, 2, 5, None), Transport::AllReduce);
    }

    #[test]
    fn ratio_checked() {
        assert!(plan(0.0, CompressWhen::Auto).check().is_err());
        assert!(plan(f64::NAN, CompressWhen::Auto).check().is_err());
        assert!(plan(1.5, CompressWhen::Auto).check().is_err());
        assert!(plan(1.0, CompressWhen::Auto).check().is_ok());
    }
}
