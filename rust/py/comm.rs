//! Bindings of the communication scheduler (`moecore.comm`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::comm::scheduler::SchedulerConfig;
use crate::comm::{
    simulate_sharded, Action, BucketConfig, CommError, CompressPlan, CompressWhen, CostModel,
    GradInfo, Link, Op, Policy, Scheduler, Sharding, StepProfile, Unit,
};

use super::errors::SchedulerMisuse;
use super::gil::guarded;

impl From<CommError> for PyErr {
    fn from(e: CommError) -> PyErr {
        SchedulerMisuse::new_err(e.to_string())
    }
}

/// (kind, op id, bucket, offset, numel, transport)
type PyAction = (&'static str, usize, usize, usize, usize, &'static str);

fn usize_arg(what: &str, v: i128) -> PyResult<usize> {
    usize::try_from(v)
        .map_err(|_| PyValueError::new_err(format!("{what} must be a non-negative int, got {v}")))
}

/// The scheduler behind `moecore.comm.Scheduler`: buckets, policies, transport decisions.
#[pyclass(module = "moecore._core", name = "CommScheduler")]
pub struct PyScheduler {
    inner: Scheduler,
}

impl PyScheduler {
    fn actions(&self, actions: Vec<Action>) -> Vec<PyAction> {
        let ts = self.inner.transports();
        let tuple = |kind, op: &Op| {
            let t = ts.get(op.bucket).map(|t| t.name()).unwrap_or("");
            (kind, op.id, op.bucket, op.offset, op.numel, t)
        };
        actions
            .into_iter()
            .map(|a| match a {
                Action::Launch { op, .. } => tuple("launch", &op),
                Action::Wait { op } => tuple("wait", &self.inner.ops()[op]),
            })
            .collect()
    }
}

#[pymethods]
impl PyScheduler {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (grads, *, world, first_bucket_bytes=1048576, cap_bytes=26214400,
        policy="fifo", partition_bytes=4194304, credit_bytes=16777216, compress_ratio=None,
        warmup_steps=0, compress_when="auto", split_layers=false))]
    fn new(
        grads: Vec<(String, i128, String, i128, i128)>,
        world: i128,
        first_bucket_bytes: i128,
        cap_bytes: i128,
        policy: &str,
        partition_bytes: i128,
        credit_bytes: i128,
        compress_ratio: Option<f64>,
        warmup_steps: i128,
        compress_when: &str,
        split_layers: bool,
    ) -> PyResult<Self> {
        let grads = grads
            .into_iter()
            .map(|(name, numel, dtype, elem_bytes, layer)| {
                Ok(GradInfo {
                    numel: usize_arg("numel", numel)?,
                    elem_bytes: usize_arg("elem_bytes", elem_bytes)?,
                    layer: u32::try_from(layer).map_err(|_| {
                        PyValueError::new_err(format!("layer of {name:?} must be in [0, 2^32)"))
                    })?,
                    name,
                    dtype,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let policy = match policy {
            "fifo" => Policy::Fifo,
            "priority" => Policy::Priority {
                partition_bytes: usize_arg("partition_bytes", partition_bytes)?,
                credit_bytes: usize_arg("credit_bytes", credit_bytes)?,
            },
            other => {
                return Err(PyValueError::new_err(format!(
                    "policy must be 'fifo' or 'priority', got {other:?}"
                )))
            }
        };
        let when = match compress_when {
            "auto" => CompressWhen::Auto,
            "always" => CompressWhen::Always,
            other => {
                return Err(PyValueError::new_err(format!(
                    "compress_when must be 'auto' or 'always', got {other:?}"
                )))
            }
        };
        let warmup_steps = u64::try_from(warmup_steps).map_err(|_| {
            PyValueError::new_err(format!("warmup_steps must be >= 0, got {warmup_steps}"))
        })?;
        let cfg = SchedulerConfig {
            buckets: BucketConfig {
                first_bucket_bytes: usize_arg("first_bucket_bytes", first_bucket_bytes)?,
                cap_bytes: usize_arg("cap_bytes", cap_bytes)?,
                split_layers,
            },
            policy,
            world: usize_arg("world", world)?,
            compress: compress_ratio.map(|ratio| CompressPlan {
                ratio,
                warmup_steps,
                when,
            }),
        };
        let inner = guarded("CommScheduler", || Scheduler::new(grads, cfg))??;
        Ok(PyScheduler { inner })
    }

    /// Steps finished so far.
    #[getter]
    fn step(&self) -> u64 {
        self.inner.step()
    }

    #[getter]
    fn rebuilt(&self) -> bool {
        self.inner.rebuilt()
    }

    #[getter]
    fn in_step(&self) -> bool {
        self.inner.in_step()
    }

    /// Each bucket as a dict: slices [(grad, offset, numel)], numel, bytes, dtype, layer.
    fn buckets<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .buckets()
            .iter()
            .map(|b| {
                let d = PyDict::new(py);
                let slices: Vec<(usize, usize, usize)> = b
                    .slices
                    .iter()
                    .map(|s| (s.grad, s.offset, s.numel))
                    .collect();
                d.set_item("slices", slices)?;
                d.set_item("numel", b.numel)?;
                d.set_item("bytes", b.bytes())?;
                d.set_item("dtype", &b.dtype)?;
                d.set_item("layer", b.layer)?;
                Ok(d)
            })
            .collect()
    }

    /// This step's transport per bucket: "allreduce" or "allgather".
    fn transports(&self) -> Vec<&'static str> {
        self.inner.transports().iter().map(|t| t.name()).collect()
    }

    /// This step's operations as (op id, bucket, part, offset, numel, bytes, layer).
    #[allow(clippy::type_complexity)]
    fn ops(&self) -> Vec<(usize, usize, usize, usize, usize, usize, u32)> {
        self.inner
            .ops()
            .iter()
            .map(|o| (o.id, o.bucket, o.part, o.offset, o.numel, o.bytes, o.layer))
            .collect()
    }

    fn begin_step(&mut self) -> PyResult<()> {
        Ok(guarded("CommScheduler.begin_step", || {
            self.inner.begin_step()
        })??)
    }

    /// Actions as (kind, op id, bucket, offset, numel, transport), kind "launch" or "wait".
    fn ready(&mut self, index: i128) -> PyResult<Vec<PyAction>> {
        let index = usize_arg("index", index)?;
        let actions = guarded("CommScheduler.ready", || self.inner.ready(index))??;
        Ok(self.actions(actions))
    }

    fn finish(&mut self) -> PyResult<Vec<PyAction>> {
        let actions = guarded("CommScheduler.finish", || self.inner.finish())??;
        Ok(self.actions(actions))
    }

    fn unready(&self) -> Vec<usize> {
        self.inner.unready()
    }

    fn observed_order(&self) -> Option<Vec<usize>> {
        self.inner.observed_order()
    }

    fn rebuild(&mut self, order: Vec<usize>) -> PyResult<()> {
        Ok(guarded("CommScheduler.rebuild", || {
            self.inner.rebuild(&order)
        })??)
    }
}

/// Predicts one steady-state step of `scheduler`'s gradients and configuration on a cost
/// model (see `rust/comm/sim.rs`), the state sharded by ZeRO stage `zero` (stage 3: over
/// `units`, (gradient indices, forward seconds) in forward order, the root first). Returns
/// step_s, compute_s, exposed_s, comm_s, ops, compressed_buckets.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (scheduler, *, forward_s, ready_order, backward_s, optimizer_s,
    ranks_per_node, intra_latency_s, intra_bytes_per_s, inter_latency_s, inter_bytes_per_s,
    hierarchical=false, compress_s_per_elem=0.0, decode_s_per_entry=0.0, copy_s_per_byte=0.0,
    fault_s_per_byte=0.0, zero=0, units=Vec::new()))]
pub fn comm_simulate<'py>(
    py: Python<'py>,
    scheduler: PyRef<'py, PyScheduler>,
    forward_s: f64,
    ready_order: Vec<usize>,
    backward_s: Vec<f64>,
    optimizer_s: f64,
    ranks_per_node: i128,
    intra_latency_s: f64,
    intra_bytes_per_s: f64,
    inter_latency_s: f64,
    inter_bytes_per_s: f64,
    hierarchical: bool,
    compress_s_per_elem: f64,
    decode_s_per_entry: f64,
    copy_s_per_byte: f64,
    fault_s_per_byte: f64,
    zero: i128,
    units: Vec<(Vec<usize>, f64)>,
) -> PyResult<Bound<'py, PyDict>> {
    let sharding = Sharding {
        stage: u8::try_from(zero)
            .ok()
            .filter(|s| *s <= 3)
            .ok_or_else(|| PyValueError::new_err(format!("zero: a stage 0-3, got {zero}")))?,
        units: units
            .into_iter()
            .map(|(grads, forward_s)| Unit { grads, forward_s })
            .collect(),
    };
    let model = CostModel {
        ranks_per_node: usize_arg("ranks_per_node", ranks_per_node)?,
        intra: Link {
            latency_s: intra_latency_s,
            bytes_per_s: intra_bytes_per_s,
        },
        inter: Link {
            latency_s: inter_latency_s,
            bytes_per_s: inter_bytes_per_s,
        },
        hierarchical,
        compress_s_per_elem,
        decode_s_per_entry,
        copy_s_per_byte,
        fault_s_per_byte,
    };
    let profile = StepProfile {
        forward_s,
        ready_order,
        backward_s,
        optimizer_s,
    };
    let grads = scheduler.inner.grads().to_vec();
    let cfg = *scheduler.inner.config();
    let r = guarded("comm_simulate", || {
        simulate_sharded(&grads, cfg, &model, &profile, &sharding)
    })??;
    let d = PyDict::new(py);
    d.set_item("step_s", r.step_s)?;
    d.set_item("compute_s", r.compute_s)?;
    d.set_item("exposed_s", r.exposed_s)?;
    d.set_item("comm_s", r.comm_s)?;
    d.set_item("ops", r.ops)?;
    d.set_item("compressed_buckets", r.compressed_buckets)?;
    Ok(d)
}
