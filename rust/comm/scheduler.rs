//! The per-step state machine: "gradient i is ready" in, "launch this / wait for that" out.

use std::collections::VecDeque;

use super::bucket::{assign_buckets, check_grads, check_order, reverse_order, Bucket};
use super::bucket::{BucketConfig, GradInfo};
use super::policy::{plan_ops, Op, Policy};
use super::transport::{choose_transport, CompressPlan, Transport};
use super::CommError;

/// What the process group must do next, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start `op` with `transport` (non-blocking).
    Launch { op: Op, transport: Transport },
    /// Block until operation `op` (an id from an earlier `Launch`) completed.
    Wait { op: usize },
}

/// Scheduler settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    pub buckets: BucketConfig,
    pub policy: Policy,
    /// Number of ranks the buckets are reduced over.
    pub world: usize,
    pub compress: Option<CompressPlan>,
}

/// Decides, step by step, which collectives to launch as gradients become ready.
///
/// A step is `begin_step`, then `ready(i)` once per gradient as backward produces it, then
/// `finish` (which treats every gradient not reported as ready-with-zeros, and ends with a
/// `Wait` for everything still in flight). A bucket is *released* once it and every bucket
/// before it are complete: decisions depend only on that order, never on timing, so all
/// ranks agree. `fifo` launches released buckets at once. `priority` launches a released
/// bucket's parts in turn, and when the bytes in flight would exceed the credit it first
/// waits for the oldest operation, as ByteScheduler's credit holds a launch until an earlier
/// one completed. That wait is a decision too, taken at the same point on every rank (never
/// "whichever completed first", which differs between ranks).
///
/// ByteScheduler also reorders: parts held back for credit go lowest layer first, so the
/// next forward can start on the first layers while the last ones are still in flight. A
/// step that waits for every gradient before the optimizer (`finish`, as in DDP) gains
/// nothing from that order, and holding parts back to reorder them leaves them to `finish`,
/// where no backward is left to hide them: credit given back only at `finish` hid 0 % of
/// the communication on loopback (fifo: 82-92 %). So parts go in release order, which on
/// every rank is bucket order.
#[derive(Debug, Clone)]
pub struct Scheduler {
    grads: Vec<GradInfo>,
    cfg: SchedulerConfig,
    buckets: Vec<Bucket>,
    grad_bucket: Vec<usize>,
    rebuilt: bool,
    step: u64,
    // Per step.
    in_step: bool,
    transports: Vec<Transport>,
    ops: Vec<Op>,
    bucket_first_op: Vec<usize>,
    ready: Vec<bool>,
    pending: Vec<usize>,
    next_release: usize,
    in_flight: VecDeque<usize>,
    in_flight_bytes: usize,
    observed: Vec<usize>,
}

impl Scheduler {
    /// Registers `grads` (in registration order: parameters nearest the input first) and
    /// builds the initial buckets in reverse registration order.
    pub fn new(grads: Vec<GradInfo>, cfg: SchedulerConfig) -> Result<Self, CommError> {
        check_grads(&grads)?;
        cfg.policy.check()?;
        if let Some(c) = &cfg.compress {
            c.check()?;
        }
        if cfg.world == 0 {
            return Err(CommError::BadConfig("world size must be at least 1".into()));
        }
        let order = reverse_order(grads.len());
        let buckets = assign_buckets(&grads, &order, cfg.buckets)?;
        let mut s = Scheduler {
            grad_bucket: Vec::new(),
            grads,
            cfg,
            buckets,
            rebuilt: false,
            step: 0,
            in_step: false,
            transports: Vec::new(),
            ops: Vec::new(),
            bucket_first_op: Vec::new(),
            ready: Vec::new(),
            pending: Vec::new(),
            next_release: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            observed: Vec::new(),
        };
        s.index_buckets();
        Ok(s)
    }

    fn index_buckets(&mut self) {
        self.grad_bucket = vec![0; self.grads.len()];
        for (b, bucket) in self.buckets.iter().enumerate() {
            for s in &bucket.slices {
                self.grad_bucket[s.grad] = b;
            }
        }
    }

    pub fn grads(&self) -> &[GradInfo] {
        &self.grads
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Steps finished so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn in_step(&self) -> bool {
        self.in_step
    }

    pub fn rebuilt(&self) -> bool {
        self.rebuilt
    }

    /// This step's operations (valid from `begin_step` to the next `begin_step`).
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// The transport of each bucket this step.
    pub fn transports(&self) -> &[Transport] {
        &self.transports
    }

    /// Gradients not reported ready yet this step (`finish` sends them as zeros).
    pub fn unready(&self) -> Vec<usize> {
        if !self.in_step {
            return Vec::new();
        }
        (0..self.grads.len()).filter(|&i| !self.ready[i]).collect()
    }

    /// Starts a step: fixes each bucket's transport and the operations.
    pub fn begin_step(&mut self) -> Result<(), CommError> {
        if self.in_step {
            return Err(CommError::BadState(
                "begin_step called twice without finish",
            ));
        }
        let world = self.cfg.world;
        let step = self.step;
        let compress = self.cfg.compress;
        self.transports = self
            .buckets
            .iter()
            .map(|b| choose_transport(b.numel, b.elem_bytes, world, step, compress.as_ref()))
            .collect();
        let partition: Vec<bool> = self
            .transports
            .iter()
            .map(|t| *t == Transport::AllReduce)
            .collect();
        self.ops = plan_ops(&self.buckets, self.cfg.policy, &partition);
        self.bucket_first_op = vec![usize::MAX; self.buckets.len()];
        for op in self.ops.iter().rev() {
            self.bucket_first_op[op.bucket] = op.id;
        }
        self.ready = vec![false; self.grads.len()];
        self.pending = self.buckets.iter().map(|b| b.slices.len()).collect();
        self.next_release = 0;
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.in_step = true;
        Ok(())
    }

    /// Gradient `index` is final for this step; returns what to do now.
    pub fn ready(&mut self, index: usize) -> Result<Vec<Action>, CommError> {
        if !self.in_step {
            return Err(CommError::BadState("ready called outside a step"));
        }
        let count = self.grads.len();
        if index >= count {
            return Err(CommError::NoSuchGrad { index, count });
        }
        if self.ready[index] {
            return Err(CommError::ReadyTwice {
                index,
                name: self.grads[index].name.clone(),
            });
        }
        self.mark_ready(index);
        let mut actions = Vec::new();
        self.release(&mut actions);
        Ok(actions)
    }

    /// Ends the step: every gradient not reported counts as ready (zeros), everything left is
    /// launched, and every operation in flight is waited for.
    pub fn finish(&mut self) -> Result<Vec<Action>, CommError> {
        if !self.in_step {
            return Err(CommError::BadState("finish called outside a step"));
        }
        for i in 0..self.grads.len() {
            if !self.ready[i] {
                self.mark_ready(i);
            }
        }
        let mut actions = Vec::new();
        self.release(&mut actions);
        while let Some(op) = self.in_flight.pop_front() {
            actions.push(Action::Wait { op });
        }
        self.in_flight_bytes = 0;
        self.in_step = false;
        self.step += 1;
        Ok(actions)
    }

    fn mark_ready(&mut self, index: usize) {
        self.ready[index] = true;
        self.pending[self.grad_bucket[index]] -= 1;
        if !self.rebuilt && self.step == 0 {
            self.observed.push(index);
        }
    }

    /// Releases complete buckets in bucket order and launches their operations: fifo at
    /// once, priority within its credit.
    fn release(&mut self, actions: &mut Vec<Action>) {
        while self.next_release < self.buckets.len() && self.pending[self.next_release] == 0 {
            let b = self.next_release;
            let first = self.bucket_first_op[b];
            let ids: Vec<usize> = (first..self.ops.len())
                .take_while(|&id| self.ops[id].bucket == b)
                .collect();
            for id in ids {
                if let Policy::Priority { credit_bytes, .. } = self.cfg.policy {
                    self.wait_for_credit(self.ops[id].bytes, credit_bytes, actions);
                }
                self.launch(id, actions);
            }
            self.next_release += 1;
        }
    }

    /// Priority only: waits for the oldest operations in flight until `bytes` more fit the
    /// credit (one operation may always be in flight, however large).
    fn wait_for_credit(&mut self, bytes: usize, credit_bytes: usize, actions: &mut Vec<Action>) {
        while self.in_flight_bytes + bytes > credit_bytes {
            let Some(oldest) = self.in_flight.pop_front() else {
                break;
            };
            self.in_flight_bytes -= self.ops[oldest].bytes;
            actions.push(Action::Wait { op: oldest });
        }
    }

    fn launch(&mut self, id: usize, actions: &mut Vec<Action>) {
        let op = self.ops[id];
        self.in_flight.push_back(id);
        self.in_flight_bytes += op.bytes;
        actions.push(Action::Launch {
            op,
            transport: self.transports[op.bucket],
        });
    }

    /// The ready order seen in the first step, completed with the gradients never seen (in
    /// registration order); None before the first step finished.
    pub fn observed_order(&self) -> Option<Vec<usize>> {
        if self.step == 0 || self.observed.len() != self.grads.len() {
            return None;
        }
        Some(self.observed.clone())
    }

    /// Rebuilds the buckets from a ready order (DDP does it once, after the first step, from
    /// rank 0's order so that all ranks agree). Allowed once, between steps.
    pub fn rebuild(&mut self, order: &[usize]) -> Result<(), CommError> {
        if self.in_step {
            return Err(CommError::BadState("rebuild called inside a step"));
        }
        if self.rebuilt {
            return Err(CommError::BadState("buckets were already rebuilt once"));
        }
        check_order(order, self.grads.len())?;
        self.buckets = assign_buckets(&self.grads, order, self.cfg.buckets)?;
        self.index_buckets();
        self.rebuilt = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::transport::CompressWhen;

    fn grads(sizes: &[usize]) -> Vec<GradInfo> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| GradInfo {
                name: format!("g{i}"),
                numel: n,
                elem_bytes: 4,
                dtype: "float32".into(),
                layer: i as u32,
            })
            .collect()
    }

    fn cfg(policy: Policy) -> SchedulerConfig {
        SchedulerConfig {
            buckets: BucketConfig {
                first_bucket_bytes: 40,
                cap_bytes: 80,
                split_layers: false,
            },
            policy,
            world: 2,
            compress: None,
        }
    }

    fn launch(s: &Scheduler, id: usize) -> Action {
        let op = s.ops()[id];
        Action::Launch {
            op,
            transport: s.transports()[op.bucket],
        }
    }

    fn launched(actions: &[Action]) -> Vec<(usize, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Launch { op, .. } => Some((op.bucket, op.part)),
                Action::Wait { .. } => None,
            })
            .collect()
    }

    #[test]
    fn fifo_launches_buckets_in_order_during_backward() {
        // 4 grads of 10 floats (40 B): buckets [3], [2, 1], [0].
        let mut s = Scheduler::new(grads(&[10, 10, 10, 10]), cfg(Policy::Fifo)).unwrap();
        assert_eq!(s.buckets().len(), 3);
        s.begin_step().unwrap();
        assert_eq!(launched(&s.ready(3).unwrap()), vec![(0, 0)]);
        // Bucket 2 ([0]) completes before bucket 1: it must wait for bucket 1.
        assert!(s.ready(0).unwrap().is_empty());
        assert!(s.ready(2).unwrap().is_empty());
        assert_eq!(launched(&s.ready(1).unwrap()), vec![(1, 0), (2, 0)]);
        let fin = s.finish().unwrap();
        assert_eq!(
            fin,
            vec![
                Action::Wait { op: 0 },
                Action::Wait { op: 1 },
                Action::Wait { op: 2 }
            ]
        );
        assert_eq!(s.step(), 1);
    }

    #[test]
    fn finish_flushes_missing_gradients_as_zeros() {
        let mut s = Scheduler::new(grads(&[10, 10, 10, 10]), cfg(Policy::Fifo)).unwrap();
        s.begin_step().unwrap();
        s.ready(3).unwrap();
        assert_eq!(s.unready(), vec![0, 1, 2]);
        let fin = s.finish().unwrap();
        assert_eq!(launched(&fin), vec![(1, 0), (2, 0)]);
        assert_eq!(fin.len(), 5);
    }

    #[test]
    fn priority_waits_for_credit_during_backward() {
        // Buckets: [3] (40 B), [2, 1] (80 B), [0] (40 B); parts of 20 B; credit 40 B.
        let p = Policy::Priority {
            partition_bytes: 20,
            credit_bytes: 40,
        };
        let mut s = Scheduler::new(grads(&[10, 10, 10, 10]), cfg(p)).unwrap();
        s.begin_step().unwrap();
        // Bucket 0 = 2 parts (ops 0, 1), both fit the credit.
        assert_eq!(
            s.ready(3).unwrap(),
            vec![launch(&s, 0), launch(&s, 1)],
            "{:?}",
            s.ops()
        );
        s.ready(2).unwrap();
        // Bucket 1 = 4 parts (ops 2..6): each waits for the oldest in flight, in backward.
        let mut expected = Vec::new();
        for id in 2..6 {
            expected.push(Action::Wait { op: id - 2 });
            expected.push(launch(&s, id));
        }
        assert_eq!(s.ready(1).unwrap(), expected);
        // Bucket 2 (ops 6, 7) likewise; finish waits for the two parts left in flight.
        let mut expected = Vec::new();
        for id in 6..8 {
            expected.push(Action::Wait { op: id - 2 });
            expected.push(launch(&s, id));
        }
        assert_eq!(s.ready(0).unwrap(), expected);
        assert_eq!(
            s.finish().unwrap(),
            vec![Action::Wait { op: 6 }, Action::Wait { op: 7 }]
        );
    }

    #[test]
    fn priority_launches_one_part_larger_than_the_credit() {
        let p = Policy::Priority {
            partition_bytes: 80,
            credit_bytes: 20,
        };
        let mut s = Scheduler::new(grads(&[10, 10, 10, 10]), cfg(p)).unwrap();
        s.begin_step().unwrap();
        assert_eq!(s.ready(3).unwrap(), vec![launch(&s, 0)]);
        s.ready(2).unwrap();
        assert_eq!(
            s.ready(1).unwrap(),
            vec![Action::Wait { op: 0 }, launch(&s, 1)]
        );
    }

    #[test]
    fn compressed_after_warmup_and_never_partitioned() {
        let mut c = cfg(Policy::Priority {
            partition_bytes: 8,
            credit_bytes: 1000,
        });
        c.compress = Some(CompressPlan {
            ratio: 0.5,
            warmup_steps: 1,
            when: CompressWhen::Always,
        });
        let mut s = Scheduler::new(grads(&[10, 10]), c).unwrap();
        s.begin_step().unwrap();
        assert!(s.transports().iter().all(|t| *t == Transport::AllReduce));
        assert!(s.ops().len() > 2);
        s.finish().unwrap();
        s.begin_step().unwrap();
        assert!(s
            .transports()
            .iter()
            .all(|t| *t == Transport::CompressedAllGather));
        assert_eq!(s.ops().len(), s.buckets().len());
    }

    #[test]
    fn rebuild_once_from_observed_order() {
        let mut s = Scheduler::new(grads(&[10, 10, 10, 10]), cfg(Policy::Fifo)).unwrap();
        assert!(s.observed_order().is_none());
        s.begin_step().unwrap();
        s.ready(1).unwrap();
        s.ready(3).unwrap();
        s.finish().unwrap();
        let order = s.observed_order().unwrap();
        assert_eq!(order, vec![1, 3, 0, 2]);
        s.rebuild(&order).unwrap();
        let sets: Vec<Vec<usize>> = s
            .buckets()
            .iter()
            .map(|b| b.slices.iter().map(|x| x.grad).collect())
            .collect();
        assert_eq!(sets, vec![vec![1], vec![3, 0], vec![2]]);
        assert!(s.rebuild(&order).is_err());
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let mut s = Scheduler::new(grads(&[10, 10]), cfg(Policy::Fifo)).unwrap();
        assert!(s.ready(0).is_err());
        assert!(s.finish().is_err());
        s.begin_step().unwrap();
        assert!(s.begin_step().is_err());
        assert_eq!(
            s.ready(5),
            Err(CommError::NoSuchGrad { index: 5, count: 2 })
        );
        s.ready(0).unwrap();
        assert!(matches!(s.ready(0), Err(CommError::ReadyTwice { .. })));
        assert!(s.rebuild(&[0, 1]).is_err());
        let mut bad = cfg(Policy::Fifo);
        bad.world = 0;
        assert!(Scheduler::new(grads(&[1]), bad).is_err());
    }
}
