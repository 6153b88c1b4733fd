//! The step-time simulator: the scheduler's own decisions replayed on a cost model.
//!
//! One steady-state step (buckets rebuilt from the profiled ready order, past the dense
//! warm-up): forward, then backward gradient by gradient — each `ready` lets the scheduler
//! launch operations, which queue on one link and run one at a time (α–β model) — then
//! `finish`. Every `Wait` blocks the rank until its operation ended. It assumes that
//! operations progress by themselves while compute runs (a polling thread, or NCCL); with
//! MPI progressed only at hooks, reality lies between this and no overlap at all.
//!
//! What the rank itself does for the communication is compute, on the compute timeline,
//! not on the link: copying the gradients of an all-reduce into its buffer and top-k
//! compression (both at the launch, which waits for them; compression reads the gradients
//! in place), and decoding the gathered payloads (when the rank waits for the operation).
//! These run on the same core (or GPU stream) as backward, so they delay it.
//!
//! ZeRO ([`Sharding`]): from stage 2 the gradient operations are reduce-scatters (half a
//! ring all-reduce on the link; each rank adds its received part into its shard), the
//! optimizer updates 1/P of the elements, and stages 1–2 end with an all-gather of every
//! bucket's parameters. Stage 3 keeps no all-gather at the end but gathers each unit (a
//! block) straight into its parameters' released pages (faulting them back, not unpacking)
//! before its forward and again before its backward, the next unit's gather
//! launched when the current one starts (FSDP's prefetch); the root unit (embeddings, head)
//! is gathered first in forward and first in backward, behind the last block's prefetch.
//! Its buckets are the first step's (ZeRO cuts its shards from them and never rebuilds).

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
    /// Seconds per byte to copy gradients into an all-reduce's buffer.
    pub copy_s_per_byte: f64,
    /// Seconds per byte that writing into memory released after its last use costs beyond
    /// writing into resident memory (page faults, the kernel's zeroing): ZeRO stage 3
    /// gathers each unit straight into its parameters' pages, released after each use.
    pub fault_s_per_byte: f64,
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

/// A unit of ZeRO stage 3: the gradients (parameters) gathered together, and its forward
/// compute.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Unit {
    pub grads: Vec<usize>,
    pub forward_s: f64,
}

/// How the data-parallel state is sharded (ZeRO).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sharding {
    /// 0 (plain data parallelism) to 3.
    pub stage: u8,
    /// Stage 3: the units in forward order, the root first; together they hold every
    /// gradient once. Their forward times replace `StepProfile::forward_s`.
    pub units: Vec<Unit>,
}

impl Sharding {
    fn check(&self, n_grads: usize) -> Result<(), CommError> {
        if self.stage > 3 {
            return Err(CommError::BadConfig(format!(
                "sharding: ZeRO stage must be 0-3, got {}",
                self.stage
            )));
        }
        if self.stage < 3 {
            return Ok(());
        }
        let mut seen = vec![false; n_grads];
        for (u, unit) in self.units.iter().enumerate() {
            if !(unit.forward_s.is_finite() && unit.forward_s >= 0.0) {
                return Err(CommError::BadConfig(format!(
                    "sharding: unit {u}'s forward_s must be finite and >= 0"
                )));
            }
            for &g in &unit.grads {
                if g >= n_grads || std::mem::replace(&mut seen[g], true) {
                    return Err(CommError::BadConfig(format!(
                        "sharding: unit {u} names gradient {g}, out of range or already in a unit"
                    )));
                }
            }
        }
        if let Some(g) = seen.iter().position(|s| !s) {
            return Err(CommError::BadConfig(format!(
                "sharding: stage 3 needs every gradient in a unit; gradient {g} is in none"
            )));
        }
        Ok(())
    }
}

/// What the simulator predicts for one step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SimResult {
    pub step_s: f64,
    pub compute_s: f64,
    /// Step time minus compute: communication not hidden behind backward.
    pub exposed_s: f64,
    /// The communication's whole cost: gradient copies, compression, link time and decoding
    /// of every operation.
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

/// One operation's time in three parts: compute before it can start (the copy into an
/// all-reduce's buffer, or compression), time on the link, compute after it ended (decoding).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OpCost {
    pub before_s: f64,
    pub link_s: f64,
    pub after_s: f64,
}

impl OpCost {
    pub fn total(&self) -> f64 {
        self.before_s + self.link_s + self.after_s
    }
}

/// One operation's [`OpCost`] on `world` ranks.
pub fn op_cost(
    m: &CostModel,
    transport: Transport,
    numel: usize,
    elem_bytes: usize,
    world: usize,
    ratio: f64,
) -> OpCost {
    if world <= 1 {
        return OpCost::default();
    }
    let k_node = m.ranks_per_node.clamp(1, world);
    let nodes = world.div_ceil(k_node);
    let slowest = if nodes > 1 { m.inter } else { m.intra };
    let bytes = (numel * elem_bytes) as f64;
    let link_s = match transport {
        Transport::AllReduce if m.hierarchical && k_node > 1 && nodes > 1 => {
            let shard = bytes / k_node as f64;
            2.0 * ring_half(m.intra, k_node, bytes) + ring_allreduce(m.inter, nodes, shard)
        }
        Transport::AllReduce => ring_allreduce(slowest, world, bytes),
        Transport::CompressedAllGather => {
            let k = topk_k(numel, ratio) as f64;
            let payload = 44.0 + 8.0 * k;
            let p = world as f64;
            return OpCost {
                before_s: m.compress_s_per_elem * numel as f64,
                link_s: (p - 1.0) * (slowest.latency_s + payload / slowest.bytes_per_s),
                after_s: m.decode_s_per_entry * p * k,
            };
        }
    };
    OpCost {
        before_s: m.copy_s_per_byte * bytes,
        link_s,
        after_s: 0.0,
    }
}

/// A reduce-scatter (`gather == false`: copy into the send buffer before, add the received
/// 1/P into the shard after) or an all-gather (unpack the whole after) of `bytes` on
/// `world` ranks.
fn half_ring_cost(m: &CostModel, bytes: f64, world: usize, gather: bool) -> OpCost {
    if world <= 1 {
        return OpCost::default();
    }
    let nodes = world.div_ceil(m.ranks_per_node.clamp(1, world));
    let slowest = if nodes > 1 { m.inter } else { m.intra };
    let (before_s, after_s) = if gather {
        (0.0, m.copy_s_per_byte * bytes)
    } else {
        (
            m.copy_s_per_byte * bytes,
            m.copy_s_per_byte * bytes / world as f64,
        )
    };
    OpCost {
        before_s,
        link_s: ring_half(slowest, world, bytes),
        after_s,
    }
}

/// Predicts one steady-state step of `grads` under `cfg` (world size and policy included).
pub fn simulate(
    grads: &[GradInfo],
    cfg: SchedulerConfig,
    model: &CostModel,
    profile: &StepProfile,
) -> Result<SimResult, CommError> {
    simulate_sharded(grads, cfg, model, profile, &Sharding::default())
}

/// The link: operations run one at a time in launch order.
struct Wire {
    free: f64,
}

impl Wire {
    /// Launches `c` at compute time `t` (which pays `before_s` first); returns when it
    /// leaves the link and the compute it needs after.
    fn launch(&mut self, c: OpCost, t: &mut f64, res: &mut SimResult) -> (f64, f64) {
        *t += c.before_s;
        let start = t.max(self.free);
        self.free = start + c.link_s;
        res.comm_s += c.total();
        res.ops += 1;
        (self.free, c.after_s)
    }
}

/// [`simulate`] with the data-parallel state sharded as `sharding` says (module docs).
pub fn simulate_sharded(
    grads: &[GradInfo],
    cfg: SchedulerConfig,
    model: &CostModel,
    profile: &StepProfile,
    sharding: &Sharding,
) -> Result<SimResult, CommError> {
    sharding.check(grads.len())?;
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
    let per_unit = [
        ("compress_s_per_elem", model.compress_s_per_elem),
        ("decode_s_per_entry", model.decode_s_per_entry),
        ("copy_s_per_byte", model.copy_s_per_byte),
        ("fault_s_per_byte", model.fault_s_per_byte),
    ];
    if let Some((name, v)) = per_unit.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
        return Err(CommError::BadConfig(format!(
            "cost model: {name} must be finite and ≥ 0, got {v}"
        )));
    }
    let mut s = Scheduler::new(grads.to_vec(), cfg)?;
    let stage = sharding.stage;
    if stage == 0 {
        // Steady state: buckets rebuilt from the ready order, past the dense warm-up.
        s.rebuild(&profile.ready_order)?;
    }
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
    let world = cfg.world;
    let units = &sharding.units;
    let unit_bytes: Vec<f64> = units
        .iter()
        .map(|u| {
            u.grads
                .iter()
                .map(|&g| (grads[g].numel * grads[g].elem_bytes) as f64)
                .sum()
        })
        .collect();
    let mut unit_of = vec![0usize; grads.len()];
    for (u, unit) in units.iter().enumerate() {
        for &g in &unit.grads {
            unit_of[g] = u;
        }
    }
    let mut wire = Wire { free: 0.0 };
    let mut res = SimResult {
        compressed_buckets,
        ..SimResult::default()
    };
    let mut t = 0.0f64;
    // Stage 3: when each unit's gather leaves the link (and its unpacking), if launched.
    let mut gather: Vec<Option<(f64, f64)>> = vec![None; units.len()];
    let launch_gather = |u: usize,
                         t: &mut f64,
                         res: &mut SimResult,
                         wire: &mut Wire,
                         gather: &mut Vec<Option<(f64, f64)>>| {
        if u < units.len() && gather[u].is_none() {
            // Received straight into the parameters: no unpacking, but their pages fault
            // back in as the bytes arrive (paid by the rank when it waits).
            let c = OpCost {
                after_s: model.fault_s_per_byte * unit_bytes[u],
                ..half_ring_cost(model, unit_bytes[u], world, true)
            };
            gather[u] = Some(wire.launch(c, t, res));
        }
    };
    let wait = |t: &mut f64, (done, after): (f64, f64)| *t = t.max(done) + after;
    let forward_s = if stage == 3 {
        // The root's gather is waited for at once, the first block's launched behind it;
        // each block waits for its own and launches the next; the root's compute (the
        // head and the loss, mostly) runs after the blocks.
        launch_gather(0, &mut t, &mut res, &mut wire, &mut gather);
        wait(&mut t, gather[0].unwrap_or_default());
        launch_gather(1, &mut t, &mut res, &mut wire, &mut gather);
        for u in 1..units.len() {
            wait(&mut t, gather[u].unwrap_or_default());
            launch_gather(u + 1, &mut t, &mut res, &mut wire, &mut gather);
            t += units[u].forward_s;
        }
        t += units.first().map_or(0.0, |r| r.forward_s);
        units.iter().map(|u| u.forward_s).sum()
    } else {
        t = profile.forward_s;
        profile.forward_s
    };
    if stage == 3 {
        // Backward: the last block's prefetch, then the root's gather, waited for.
        gather = vec![None; units.len()];
        if units.len() > 1 {
            launch_gather(units.len() - 1, &mut t, &mut res, &mut wire, &mut gather);
        }
        launch_gather(0, &mut t, &mut res, &mut wire, &mut gather);
        wait(&mut t, gather[0].unwrap_or_default());
    }
    // Per operation: when it leaves the link, and the compute it needs after that.
    let mut end = vec![(0.0f64, 0.0f64); s.ops().len()];
    let mut run =
        |actions: Vec<Action>, t: &mut f64, res: &mut SimResult, wire: &mut Wire, s: &Scheduler| {
            for a in actions {
                match a {
                    Action::Launch { op, transport } => {
                        let b = &s.buckets()[op.bucket];
                        let c = if stage >= 2 {
                            half_ring_cost(model, (op.numel * b.elem_bytes) as f64, world, false)
                        } else {
                            op_cost(model, transport, op.numel, b.elem_bytes, world, ratio)
                        };
                        end[op.id] = wire.launch(c, t, res);
                    }
                    Action::Wait { op } => wait(t, end[op]),
                }
            }
        };
    let mut begun = vec![false; units.len()];
    for (&g, &dt) in profile.ready_order.iter().zip(&profile.backward_s) {
        if stage == 3 {
            let u = unit_of[g];
            if u != 0 && !std::mem::replace(&mut begun[u], true) {
                // This block's backward starts: its gather, and the next block's prefetch.
                launch_gather(u, &mut t, &mut res, &mut wire, &mut gather);
                wait(&mut t, gather[u].unwrap_or_default());
                if u > 1 {
                    launch_gather(u - 1, &mut t, &mut res, &mut wire, &mut gather);
                }
            }
        }
        t += dt;
        let actions = s.ready(g)?;
        run(actions, &mut t, &mut res, &mut wire, &s);
    }
    let actions = s.finish()?;
    run(actions, &mut t, &mut res, &mut wire, &s);
    // The optimizer updates this rank's 1/P of the elements from stage 1 on.
    let optimizer_s = if stage >= 1 {
        profile.optimizer_s / world as f64
    } else {
        profile.optimizer_s
    };
    t += optimizer_s;
    if stage == 1 || stage == 2 {
        // Every bucket's updated parameters all-gathered, launched together, unpacked in
        // order as each arrives.
        let launched: Vec<(f64, f64)> = s
            .buckets()
            .iter()
            .map(|b| {
                let c = half_ring_cost(model, b.bytes() as f64, world, true);
                wire.launch(c, &mut t, &mut res)
            })
            .collect();
        for done in launched {
            wait(&mut t, done);
        }
    }
    res.step_s = t;
    res.compute_s = forward_s + profile.backward_s.iter().sum::<f64>() + optimizer_s;
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
            copy_s_per_byte: 0.0,
            fault_s_per_byte: 0.0,
        }
    }

    fn cfg(world: usize, compress: Option<CompressPlan>) -> SchedulerConfig {
        SchedulerConfig {
            buckets: BucketConfig {
                first_bucket_bytes: 4000,
                cap_bytes: 4000,
                split_layers: false,
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
        let d = op_cost(&model(), Transport::AllReduce, 1000, 4, 2, 1.0).total();
        assert!((d - 0.004).abs() < 1e-12);
        let mut m = model();
        m.inter.latency_s = 0.001;
        // 4 ranks: 2·3·1 ms + 2·(3/4)·4000/1e6 = 6 ms + 6 ms.
        let d = op_cost(&m, Transport::AllReduce, 1000, 4, 4, 1.0).total();
        assert!((d - 0.012).abs() < 1e-12);
        // Top-k 0.01 of 1000: k = 10, payload 124 B, 3 peers: 3·(1 ms + 124 µs).
        let d = op_cost(&m, Transport::CompressedAllGather, 1000, 4, 4, 0.01).total();
        assert!((d - 3.0 * (0.001 + 124e-6)).abs() < 1e-12);
    }

    #[test]
    fn hierarchical_cuts_inter_node_traffic() {
        let mut m = model();
        m.ranks_per_node = 4;
        m.intra.bytes_per_s = 1e9;
        let flat = op_cost(&m, Transport::AllReduce, 1 << 20, 4, 16, 1.0).total();
        m.hierarchical = true;
        let hier = op_cost(&m, Transport::AllReduce, 1 << 20, 4, 16, 1.0).total();
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
    fn copies_compression_and_decoding_are_on_the_compute_timeline() {
        // 4 gradients of 1000 floats in one 16000-byte bucket, 2 ranks, a link so fast it
        // costs nothing: the step is compute plus the rank's own work, by hand. A dense
        // bucket is copied before its all-reduce; a compressed one is compressed in place.
        let g = grads(4, 1000);
        let mut m = model();
        m.intra.bytes_per_s = 1e18;
        m.inter.bytes_per_s = 1e18;
        m.copy_s_per_byte = 1e-9; // 16 µs for the 16000-byte bucket
        let mut c = cfg(2, None);
        c.buckets.cap_bytes = 1 << 20;
        c.buckets.first_bucket_bytes = 1 << 20;
        let compute = 0.5 + 4.0 * 0.001 + 0.25;
        let dense = simulate(&g, c, &m, &profile(4, 0.001)).unwrap();
        assert!(
            (dense.step_s - (compute + 16e-6)).abs() < 1e-12,
            "{dense:?}"
        );
        // Compressed: k = 10 of 4000 elements, 2 payloads to decode.
        c.compress = Some(CompressPlan {
            ratio: 0.0025,
            warmup_steps: 0,
            when: CompressWhen::Always,
        });
        m.compress_s_per_elem = 1e-6; // 4 ms for the bucket
        m.decode_s_per_entry = 1e-4; // 2 ms for 2 × 10 entries
        let topk = simulate(&g, c, &m, &profile(4, 0.001)).unwrap();
        assert_eq!(topk.compressed_buckets, 1);
        let want = compute + 4e-3 + 2e-3;
        assert!((topk.step_s - want).abs() < 1e-9, "{topk:?} vs {want}");
        assert!((topk.comm_s - 6e-3).abs() < 1e-9, "{topk:?}");
        m.copy_s_per_byte = -1.0;
        let err = simulate(&g, c, &m, &profile(4, 0.001)).unwrap_err();
        assert!(err.to_string().contains("copy_s_per_byte"), "{err}");
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

#[cfg(test)]
#[path = "sim_zero_tests.rs"]
mod zero_tests;
