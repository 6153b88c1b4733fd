//! The ZeRO stages of the simulator against step times worked out by hand.

use super::*;
use crate::comm::bucket::BucketConfig;
use crate::comm::policy::Policy;

/// 4 gradients of 1000 floats, one 4000-byte bucket each; 2 ranks on a 1 MB/s link with no
/// latency: an all-reduce takes 4 ms, a reduce-scatter or an all-gather of a bucket 2 ms.
fn setup() -> (Vec<GradInfo>, SchedulerConfig, CostModel, StepProfile) {
    let grads = (0..4)
        .map(|i| GradInfo {
            name: format!("g{i}"),
            numel: 1000,
            elem_bytes: 4,
            dtype: "float32".into(),
            layer: i as u32,
        })
        .collect();
    let cfg = SchedulerConfig {
        buckets: BucketConfig {
            first_bucket_bytes: 4000,
            cap_bytes: 4000,
            split_layers: false,
        },
        policy: Policy::Fifo,
        world: 2,
        compress: None,
    };
    let link = Link {
        latency_s: 0.0,
        bytes_per_s: 1e6,
    };
    let model = CostModel {
        ranks_per_node: 1,
        intra: link,
        inter: link,
        hierarchical: false,
        compress_s_per_elem: 0.0,
        decode_s_per_entry: 0.0,
        copy_s_per_byte: 0.0,
        fault_s_per_byte: 0.0,
    };
    let profile = StepProfile {
        forward_s: 0.5,
        ready_order: vec![3, 2, 1, 0],
        backward_s: vec![0.010; 4],
        optimizer_s: 0.25,
    };
    (grads, cfg, model, profile)
}

fn stage(stage: u8) -> Sharding {
    Sharding {
        stage,
        units: Vec::new(),
    }
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() < 1e-9
}

#[test]
fn stages_one_and_two_by_hand() {
    let (g, cfg, m, p) = setup();
    // Plain: the last all-reduce (4 ms) sticks out; the whole optimizer.
    let r = simulate_sharded(&g, cfg, &m, &p, &stage(0)).unwrap();
    assert!(close(r.step_s, 0.5 + 0.04 + 0.004 + 0.25), "{r:?}");
    // Stage 1: the same all-reduces, half the optimizer, then 4 all-gathers of 2 ms.
    let r = simulate_sharded(&g, cfg, &m, &p, &stage(1)).unwrap();
    assert!(close(r.step_s, 0.5 + 0.04 + 0.004 + 0.125 + 0.008), "{r:?}");
    assert_eq!(r.ops, 8);
    // Stage 2: reduce-scatters (2 ms, the last sticks out), then the same all-gathers.
    let r = simulate_sharded(&g, cfg, &m, &p, &stage(2)).unwrap();
    assert!(close(r.step_s, 0.5 + 0.04 + 0.002 + 0.125 + 0.008), "{r:?}");
    assert!(close(r.comm_s, 8.0 * 0.002), "{r:?}");
    assert!(close(r.exposed_s, 0.010), "{r:?}");
}

#[test]
fn stage_two_pays_the_copies_on_the_compute_timeline() {
    let (g, cfg, mut m, p) = setup();
    m.intra.bytes_per_s = 1e18;
    m.inter.bytes_per_s = 1e18;
    m.copy_s_per_byte = 1e-6; // 4 ms to pack a bucket, 2 ms to add its half, 4 ms to unpack
    let r = simulate_sharded(&g, cfg, &m, &p, &stage(2)).unwrap();
    let want = 0.5 + 0.04 + 0.125 + 4.0 * (0.004 + 0.002) + 4.0 * 0.004;
    assert!(close(r.step_s, want), "{r:?} vs {want}");
}

/// Stage 3 over 4 units: the root holds gradient 0, blocks 1–3 one gradient each; 0.1 s
/// forward each.
fn four_units() -> Sharding {
    let units = (0..4)
        .map(|u| Unit {
            grads: vec![u],
            forward_s: 0.1,
        })
        .collect();
    Sharding { stage: 3, units }
}

#[test]
fn stage_three_prefetches_by_hand() {
    let (g, cfg, m, p) = setup();
    let r = simulate_sharded(&g, cfg, &m, &p, &four_units()).unwrap();
    // Forward: the root's gather (2 ms) is exposed; block 1's (launched behind it) is
    // waited for at 4 ms; every later gather hides behind the block before: 0.004 + 0.4.
    // Backward from 0.404: block 3's prefetch then the root's gather, waited for (0.408);
    // block 3 (already there) launches block 2's gather (done 0.410) and computes to
    // 0.418, its reduce-scatter leaves at 0.420; block 2 launches block 1's (0.422),
    // computes to 0.428, reduce-scatter 0.430; block 1 to 0.438 (0.440); the root to 0.448
    // (0.450). Finish waits for 0.450; the optimizer's half: 0.575, no all-gather after.
    assert!(close(r.step_s, 0.575), "{r:?}");
    assert!(close(r.compute_s, 0.4 + 0.04 + 0.125), "{r:?}");
    assert_eq!(r.ops, 4 + 4 + 4);
}

#[test]
fn stage_three_pays_the_refaults_at_each_wait() {
    let (g, cfg, mut m, p) = setup();
    m.intra.bytes_per_s = 1e18;
    m.inter.bytes_per_s = 1e18;
    m.copy_s_per_byte = 0.0;
    let sharding = four_units();
    let free = simulate_sharded(&g, cfg, &m, &p, &sharding).unwrap();
    assert!(close(free.step_s, 0.4 + 0.04 + 0.125), "{free:?}");
    // 4 ms to fault back each unit's 4000 bytes, paid when the rank waits for its gather:
    // every unit once in forward and once in backward, nothing hides it.
    m.fault_s_per_byte = 1e-6;
    let r = simulate_sharded(&g, cfg, &m, &p, &sharding).unwrap();
    assert!(close(r.step_s, free.step_s + 8.0 * 0.004), "{r:?}");
    // Stages 1–2 gather into buffers they unpack: no refaults there.
    let r2 = simulate_sharded(&g, cfg, &m, &p, &stage(2)).unwrap();
    m.fault_s_per_byte = 0.0;
    let r2_free = simulate_sharded(&g, cfg, &m, &p, &stage(2)).unwrap();
    assert!(close(r2.step_s, r2_free.step_s), "{r2:?}");
}

#[test]
fn bad_sharding_is_an_error() {
    let (g, cfg, m, p) = setup();
    let err = simulate_sharded(&g, cfg, &m, &p, &stage(4)).unwrap_err();
    assert!(err.to_string().contains("stage must be 0-3"), "{err}");
    let missing = Sharding {
        stage: 3,
        units: vec![Unit {
            grads: vec![0, 1, 2],
            forward_s: 0.1,
        }],
    };
    let err = simulate_sharded(&g, cfg, &m, &p, &missing).unwrap_err();
    assert!(err.to_string().contains("gradient 3 is in none"), "{err}");
    let twice = Sharding {
        stage: 3,
        units: vec![
            Unit {
                grads: vec![0, 1],
                forward_s: 0.1,
            },
            Unit {
                grads: vec![1, 2, 3],
                forward_s: 0.1,
            },
        ],
    };
    let err = simulate_sharded(&g, cfg, &m, &p, &twice).unwrap_err();
    assert!(err.to_string().contains("already in a unit"), "{err}");
}
