//! The step-time simulator: the scheduler's own decisions replayed on a cost model.
//!
//! One steady-state step (buckets rebuilt from the profiled ready order, past the dense
//! warm-up): forward, then backward gradient by gradient — each `ready` lets the scheduler
//! launch operations, which queue on one link and run one at a time (α–β model) — then
//! `finish`. Every `Wait` blocks the rank until its operation ended. It assumes that
//! operations progress by themselves while compute runs (a polling thread, or NCCL); with
//! MPI progressed only at hooks, reality lies between this and no overlap at all.

use super::bucket::GradInfo;
use super::scheduler::{Action, Scheduler, SchedulerConfig};
use super::transport::{topk_k, Transport};
use super::CommError;

/// A link: latency (seconds) and bandwidth (bytes per second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub latency_s: f64,
    pub bytes_per_s: f64,
}

/// Where the time goes besides compute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Ranks per node (consecutive ranks share a node).
    pub ranks_per_node: usize,
    /// Between ranks of one node.
    pub intra: Link,
    /// Between nodes.
    pub inter: Link,
    /// Hierarchical all-reduce (reduce-scatter in node, all-reduce across, all-gather in).
    pub hierarchical: bool,
    /// Seconds per element to top-k compress a bucket (with error feedback).
    pub compress_s_per_elem: f64,
    /// Seconds per received entry to decode and sum the gathered payloads.
    pub decode_s_per_entry: f64,
}

/// The compute of one step, from a profile or given.
#[derive(Debug, Clone, PartialEq)]
pub struct StepProfile {
    pub forward_s: f64,
    /// Gradients in the order backward finishes them.
    pub ready_order: Vec<usize>,
    /// `backward_s[j]`: compute time from the previous gradient (or the start of backward)
    /// until `ready_order[j]` is ready.
    pub backward_s: Vec<f64>,
    /// Optimizer step and everything after the communication.
    pub optimizer_s: f64,
}

/// What the simulator predicts for one step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SimResult {
    pub step_s: f64,
    pub compute_s: f64,
    /// Step time minus compute: communication not hidden behind backward.
    pub exposed_s: f64,
    /// Sum of the operations' durations.
    pub comm_s: f64,
    pub ops: usize,
    pub compressed_buckets: usize,
}

fn ring_allreduce(link: Link, ranks: usize, bytes: f64) -> f64 {
    if ranks <= 1 {
        return 0.0;
    }
    let p = ranks as f64;
    2.0 * (p - 1.0) * link.latency_s + 2.0 * (p - 1.0) / p * bytes / link.bytes_per_s
}

fn ring_half(link: Link, ranks: usize, bytes: f64) -> f64 {
    // Reduce-scatter or all-gather alone: half a ring all-reduce.
    ring_allreduce(link, ranks, bytes) / 2.0
}

/// Seconds one operation takes on `world` ranks.
pub fn op_seconds(
    m: &CostModel,
    transport: Transport,
    numel: usize,
    elem_bytes: usize,
    world: usize,
    ratio: f64,
) -> f64 {
    if world <= 1 {
        return 0.0;
    }
    let k_node = m.ranks_per_node.clamp(1, world);
    let nodes = world.div_ceil(k_node);
    let slowest = if nodes > 1 { m.inter } else { m.intra };
    let bytes = (numel * elem_bytes) as f64;
    match transport {
        Transport::AllReduce if m.hierarchical && k_node > 1 && nodes > 1 => {
            let shard = bytes / k_node as f64;
            2.0 * ring_half(m.intra, k_node, bytes) + ring_allreduce(m.inter, nodes, shard)
        }
        Transport::AllReduce => ring_allreduce(slowest, world, bytes),
        Transport::CompressedAllGather => {
            let k = topk_k(numel, ratio) as f64;
            let payload = 44.0 + 8.0 * k;
            let p = world as f64;
            (p - 1.0) * (slowest.latency_s + payload / slowest.bytes_per_s)
                + m.compress_s_per_elem * numel as f64
                + m.decode_s_per_entry * p * k
        }
    }
}

/// Predicts one steady-state step of `grads` under `cfg` (world size and policy included).
pub fn simulate(
    grads: &[GradInfo],
    cfg: SchedulerConfig,
    model: &CostModel,
    profile: &StepProfile,
) -> Result<SimResult, CommError> {
    if profile.backward_s.len() != profile.ready_order.len() {
        return Err(CommError::BadConfig(format!(
            "profile: {} backward times for {} gradients",
            profile.backward_s.len(),
            profile.ready_order.len()
        )));
    }
    let all = [profile.forward_s, profile.optimizer_s];
    if all
        .iter()
        .chain(&profile.backward_s)
        .any(|t| !t.is_finite() || *t < 0.0)
    {
        return Err(CommError::BadConfig(
            "profile times must be finite and non-negative".into(),
        ));
    }
    let bad_link = |l: Link| !(l.latency_s >= 0.0 && l.bytes_per_s > 0.0);
    if model.ranks_per_node == 0 || bad_link(model.intra) || bad_link(model.inter) {
        return Err(CommError::BadConfig(
            "cost model: ranks_per_node ≥ 1, latency ≥ 0 and bandwidth > 0".into(),
        ));
    }
    let mut s = Scheduler::new(grads.to_vec(), cfg)?;
    // Steady state: buckets rebuilt from the ready order, past the dense warm-up.
    s.rebuild(&profile.ready_order)?;
    let warmup = cfg.compress.map(|c| c.warmup_steps).unwrap_or(0);
    for _ in 0..warmup {
        s.begin_step()?;
        s.finish()?;
    }
    s.begin_step()?;
    let ratio = cfg.compress.map(|c| c.ratio).unwrap_or(1.0);
    let compressed_buckets = s
        .transports()
        .iter()
        .filter(|t| **t == Transport::CompressedAllGather)
        .count();
    let mut t = profile.forward_s;
    let mut link_free = 0.0f64;
    let mut end = vec![0.0f64; s.ops().len()];
    let mut res = SimResult {
        compressed_buckets,
        ..SimResult::default()
    };
    let mut run = |actions: Vec<Action>, t: &mut f64, res: &mut SimResult, s: &Scheduler| {
        for a in actions {
            match a {
                Action::Launch { op, transport } => {
                    let b = &s.buckets()[op.bucket];
                    let d = op_seconds(model, transport, op.numel, b.elem_bytes, cfg.world, ratio);
                    let start = t.max(link_free);
                    link_free = start + d;
                    end[op.id] = link_free;
                    res.comm_s += d;
                    res.ops += 1;
                }
                Action::Wait { op } => *t = t.max(end[op]),
            }
        }
    };
    for (&g, &dt) in profile.ready_order.iter().zip(&profile.backward_s) {
        t += dt;
        let actions = s.ready(g)?;
        run(actions, &mut t, &mut res, &s);
    }
    let actions = s.finish()?;
    run(actions, &mut t, &mut res, &s);
    res.step_s = t + profile.optimizer_s;
    res.compute_s =
        profile.forward_s + profile.backward_s.iter().sum::<f64>() + profile.optimizer_s;
    res.exposed_s = (res.step_s - res.compute_s).max(0.0);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::bucket::BucketConfig;
    use crate::comm::policy::Policy;
    use crate::comm::transport::{CompressPlan, CompressWhen};

    fn grads(n: usize, numel: usize) -> Vec<GradInfo> {
        (0..n)
            .map(|i| GradInfo {
                name: format!("g{i}"),
                numel,
                elem_bytes: 4,
                dtype: "float32".into(),
                layer: i as u32,
            })
            .collect()
    }

    fn model() -> CostModel {
        let link = Link {
            latency_s: 0.0,
            bytes_per_s: 1e6,
        };
        CostModel {
            ranks_per_node: 1,
            intra: link,
            inter: link,
            hierarchical: false,
            compress_s_per_elem: 0.0,
            decode_s_per_entry: 0.0,
        }
    }

    fn cfg(world: usize, compress: Option<CompressPlan>) -> SchedulerConfig {
        SchedulerConfig {
            buckets: BucketConfig {
                first_bucket_bytes: 4000,
                cap_bytes: 4000,
            },
            policy: Policy::Fifo,
            world,
            compress,
        }
    }

    fn profile(n: usize, each: f64) -> StepProfile {
        StepProfile {
            forward_s: 0.5,
            ready_order: (0..n).rev().collect(),
            backward_s: vec![each; n],
            optimizer_s: 0.25,
        }
    }

    #[test]
    fn ring_cost_by_hand() {
        // 2 ranks, 4000 B: 2·(1/2)·4000 / 1e6 = 4 ms.
        let d = op_seconds(&model(), Transport::AllReduce, 1000, 4, 2, 1.0);
        assert!((d - 0.004).abs() < 1e-12);
        let mut m = model();
        m.inter.latency_s = 0.001;
        // 4 ranks: 2·3·1 ms + 2·(3/4)·4000/1e6 = 6 ms + 6 ms.
        let d = op_seconds(&m, Transport::AllReduce, 1000, 4, 4, 1.0);
        assert!((d - 0.012).abs() < 1e-12);
        // Top-k 0.01 of 1000: k = 10, payload 124 B, 3 peers: 3·(1 ms + 124 µs).
        let d = op_seconds(&m, Transport::CompressedAllGather, 1000, 4, 4, 0.01);
        assert!((d - 3.0 * (0.001 + 124e-6)).abs() < 1e-12);
    }

    #[test]
    fn hierarchical_cuts_inter_node_traffic() {
        let mut m = model();
        m.ranks_per_node = 4;
        m.intra.bytes_per_s = 1e9;
        let flat = op_seconds(&m, Transport::AllReduce, 1 << 20, 4, 16, 1.0);
        m.hierarchical = true;
        let hier = op_seconds(&m, Transport::AllReduce, 1 << 20, 4, 16, 1.0);
        assert!(hier < flat / 3.0, "{hier} vs {flat}");
    }

    #[test]
    fn hidden_when_backward_is_longer_exposed_when_shorter() {
        // 4 grads of 1000 floats, one bucket each; each all-reduce on 2 ranks takes 4 ms.
        let g = grads(4, 1000);
        // Backward 10 ms per gradient: each bucket is done before the next is ready; only
        // the last one (4 ms) sticks out.
        let r = simulate(&g, cfg(2, None), &model(), &profile(4, 0.010)).unwrap();
        assert_eq!(r.ops, 4);
        assert!((r.comm_s - 0.016).abs() < 1e-12);
        assert!((r.exposed_s - 0.004).abs() < 1e-9, "{r:?}");
        // Backward 1 ms per gradient: the link is the bottleneck, 16 ms from the first
        // ready (1 ms into backward): step = 0.5 + 0.001 + 0.016 + 0.25.
        let r = simulate(&g, cfg(2, None), &model(), &profile(4, 0.001)).unwrap();
        assert!((r.step_s - 0.767).abs() < 1e-9, "{r:?}");
        // One rank: nothing to send.
        let r = simulate(&g, cfg(1, None), &model(), &profile(4, 0.001)).unwrap();
        assert_eq!(r.exposed_s, 0.0);
    }

    #[test]
    fn compression_after_warmup_shrinks_exposed_time() {
        let g = grads(4, 100_000);
        let plan = CompressPlan {
            ratio: 0.01,
            warmup_steps: 3,
            when: CompressWhen::Auto,
        };
        let mut c = cfg(8, Some(plan));
        c.buckets.cap_bytes = 1 << 30;
        let dense = simulate(&g, cfg(8, None), &model(), &profile(4, 0.001)).unwrap();
        let topk = simulate(&g, c, &model(), &profile(4, 0.001)).unwrap();
        assert!(topk.compressed_buckets > 0);
        assert!(
            topk.exposed_s < dense.exposed_s / 10.0,
            "{topk:?} {dense:?}"
        );
    }

    #[test]
    fn bad_profile_is_an_error() {
        let g = grads(2, 10);
        let mut p = profile(2, 0.001);
        p.backward_s.pop();
        assert!(simulate(&g, cfg(2, None), &model(), &p).is_err());
        let mut p = profile(2, 0.001);
        p.forward_s = f64::NAN;
        assert!(simulate(&g, cfg(2, None), &model(), &p).is_err());
        let mut m = model();
        m.inter.bytes_per_s = 0.0;
        assert!(simulate(&g, cfg(2, None), &m, &profile(2, 0.001)).is_err());
    }
}
