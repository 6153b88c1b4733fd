//! Property tests: bucketing is a partition, and every rank issues the same collectives in
//! the same order whatever order (or subset) of gradients it sees ready.

use proptest::prelude::*;

use super::bucket::{assign_buckets, BucketConfig, GradInfo};
use super::policy::Policy;
use super::scheduler::{Action, Scheduler, SchedulerConfig};
use super::transport::{CompressPlan, CompressWhen};

fn grads_strategy() -> impl Strategy<Value = Vec<GradInfo>> {
    prop::collection::vec((0usize..200, 0u32..6, prop::bool::ANY), 1..24).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (numel, layer, half))| GradInfo {
                name: format!("g{i}"),
                numel,
                elem_bytes: if half { 2 } else { 4 },
                dtype: if half { "float16" } else { "float32" }.into(),
                layer,
            })
            .collect()
    })
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Fifo),
        (1usize..300, 1usize..1500).prop_map(|(p, c)| Policy::Priority {
            partition_bytes: p,
            credit_bytes: c,
        }),
    ]
}

/// Runs one step: reports `ready` in that order (a subset: the others are flushed at
/// finish) and returns every action of the step.
fn run_step(s: &mut Scheduler, ready: &[usize]) -> Vec<Action> {
    s.begin_step().unwrap();
    let mut all = Vec::new();
    for &i in ready {
        all.extend(s.ready(i).unwrap());
    }
    all.extend(s.finish().unwrap());
    all
}

proptest! {
    #[test]
    fn buckets_partition_the_gradients(
        grads in grads_strategy(),
        first in 1usize..400,
        cap in 1usize..800,
        seed in any::<u64>(),
    ) {
        let n = grads.len();
        let mut order: Vec<usize> = (0..n).collect();
        // A seeded shuffle (Fisher–Yates with an LCG), so any order is exercised.
        let mut x = seed | 1;
        for i in (1..n).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (x >> 33) as usize % (i + 1));
        }
        let cfg = BucketConfig { first_bucket_bytes: first, cap_bytes: cap, split_layers: false };
        let buckets = assign_buckets(&grads, &order, cfg).unwrap();
        let mut seen = vec![0; n];
        for (bi, b) in buckets.iter().enumerate() {
            let mut offset = 0;
            for s in &b.slices {
                prop_assert_eq!(s.offset, offset);
                prop_assert_eq!(s.numel, grads[s.grad].numel);
                prop_assert_eq!(&grads[s.grad].dtype, &b.dtype);
                prop_assert!(grads[s.grad].layer >= b.layer);
                offset += s.numel;
                seen[s.grad] += 1;
            }
            prop_assert_eq!(offset, b.numel);
            // Closed only once it reached its limit: without its last gradient it was below.
            let limit = if bi == 0 { first } else { cap };
            let last = b.slices.last().map(|s| grads[s.grad].bytes()).unwrap_or(0);
            prop_assert!(b.bytes() - last < limit.max(first));
        }
        prop_assert!(seen.iter().all(|&c| c == 1));
    }

    #[test]
    fn same_collectives_in_same_order_on_every_rank(
        grads in grads_strategy(),
        policy in policy_strategy(),
        first in 1usize..400,
        cap in 1usize..800,
        compress in prop::option::of((0.01f64..1.0, 0u64..2)),
        orders in prop::collection::vec((any::<u64>(), 0.0f64..1.0), 2..4),
    ) {
        let n = grads.len();
        let cfg = SchedulerConfig {
            buckets: BucketConfig { first_bucket_bytes: first, cap_bytes: cap, split_layers: false },
            policy,
            world: 3,
            compress: compress.map(|(ratio, warmup_steps)| CompressPlan {
                ratio,
                warmup_steps,
                when: CompressWhen::Auto,
            }),
        };
        let mut reference: Option<Vec<Vec<Action>>> = None;
        let mut order0: Option<Vec<usize>> = None;
        for (seed, keep) in orders {
            // Each "rank" sees its own order and drops some gradients (experts without
            // tokens), for three steps; after the first, the buckets are rebuilt from rank
            // 0's observed order, as DDP does.
            let mut s = Scheduler::new(grads.clone(), cfg).unwrap();
            let mut steps = Vec::new();
            for step in 0..3u64 {
                let mut order: Vec<usize> = (0..n).collect();
                let mut x = (seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
                for i in (1..n).rev() {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    order.swap(i, (x >> 33) as usize % (i + 1));
                }
                let cut = ((n as f64) * keep) as usize;
                let actions = run_step(&mut s, &order[..cut]);
                // Each op is launched once and waited for once, after its launch; the
                // credit bounds the bytes in flight.
                let ops = s.ops().len();
                let mut launched = vec![false; ops];
                let mut waited = vec![false; ops];
                let mut in_flight = 0usize;
                for a in &actions {
                    match *a {
                        Action::Launch { op, .. } => {
                            prop_assert!(!launched[op.id]);
                            launched[op.id] = true;
                            in_flight += op.bytes;
                            if let Policy::Priority { credit_bytes, .. } = policy {
                                prop_assert!(in_flight <= credit_bytes || in_flight == op.bytes);
                            }
                        }
                        Action::Wait { op } => {
                            prop_assert!(launched[op] && !waited[op]);
                            waited[op] = true;
                            in_flight -= s.ops()[op].bytes;
                        }
                    }
                }
                prop_assert!(launched.iter().all(|&b| b) && waited.iter().all(|&b| b));
                steps.push(actions);
                if step == 0 {
                    let o = order0.get_or_insert_with(|| s.observed_order().unwrap()).clone();
                    s.rebuild(&o).unwrap();
                }
            }
            match &reference {
                None => reference = Some(steps),
                // The whole sequence of launches and waits is the same on every rank.
                Some(r) => prop_assert_eq!(r, &steps),
            }
        }
    }
}
