//! Policies as data: how buckets become operations, and in which order they may go.

use super::bucket::Bucket;
use super::CommError;

/// The launch policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// One operation per bucket, launched in bucket order (PyTorch DDP).
    Fifo,
    /// ByteScheduler's partitioning and credit: dense buckets above `partition_bytes` are cut
    /// into parts, launched in order; at most `credit_bytes` are in flight (at least one
    /// operation always is), and launching beyond the credit first waits for the oldest.
    Priority {
        partition_bytes: usize,
        credit_bytes: usize,
    },
}

impl Policy {
    pub fn check(&self) -> Result<(), CommError> {
        if let Policy::Priority {
            partition_bytes,
            credit_bytes,
        } = *self
        {
            if partition_bytes == 0 || credit_bytes == 0 {
                return Err(CommError::BadConfig(
                    "priority policy: partition_bytes and credit_bytes must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

/// One collective: elements `offset..offset+numel` of bucket `bucket`'s flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Index in the step's operation list.
    pub id: usize,
    pub bucket: usize,
    /// Part number within the bucket.
    pub part: usize,
    pub offset: usize,
    pub numel: usize,
    pub bytes: usize,
    /// Layer of the bucket (lower = nearer the input = higher priority).
    pub layer: u32,
}

/// The operations of a step, by bucket then part. `partition[b]` says whether bucket `b` may
/// be cut (dense buckets only: a compressed bucket is compressed whole).
pub fn plan_ops(buckets: &[Bucket], policy: Policy, partition: &[bool]) -> Vec<Op> {
    let mut ops = Vec::new();
    for (b, bucket) in buckets.iter().enumerate() {
        let part_elems = match policy {
            Policy::Priority {
                partition_bytes, ..
            } if partition.get(b).copied().unwrap_or(false) => {
                (partition_bytes / bucket.elem_bytes).max(1)
            }
            _ => bucket.numel.max(1),
        };
        let mut offset = 0;
        let mut part = 0;
        loop {
            let numel = part_elems.min(bucket.numel - offset);
            ops.push(Op {
                id: ops.len(),
                bucket: b,
                part,
                offset,
                numel,
                bytes: numel * bucket.elem_bytes,
                layer: bucket.layer,
            });
            offset += numel;
            part += 1;
            if offset >= bucket.numel {
                break;
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::bucket::Slice;

    fn bucket(numel: usize, layer: u32) -> Bucket {
        Bucket {
            slices: vec![Slice {
                grad: 0,
                offset: 0,
                numel,
            }],
            numel,
            elem_bytes: 4,
            dtype: "float32".into(),
            layer,
        }
    }

    #[test]
    fn priority_partitions_dense_buckets_only() {
        let b = vec![bucket(10, 1), bucket(3, 0)];
        let p = Policy::Priority {
            partition_bytes: 16,
            credit_bytes: 100,
        };
        let ops = plan_ops(&b, p, &[true, false]);
        let parts: Vec<(usize, usize, usize)> =
            ops.iter().map(|o| (o.bucket, o.offset, o.numel)).collect();
        assert_eq!(parts, vec![(0, 0, 4), (0, 4, 4), (0, 8, 2), (1, 0, 3)]);
        assert_eq!(ops[2].bytes, 8);
        let fifo = plan_ops(&b, Policy::Fifo, &[true, true]);
        assert_eq!(fifo.len(), 2);
        assert!(Policy::Priority {
            partition_bytes: 0,
            credit_bytes: 1
        }
        .check()
        .is_err());
    }
}
