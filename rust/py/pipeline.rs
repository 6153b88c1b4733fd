//! Bindings of the pipeline schedules and their simulator
//! (`moecore.distributed.pipeline.schedule`).

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::comm::pipeline::{build, simulate, Kind, Pass, PipeCost, PipelineError, Schedule, Step};

use super::errors::SchedulerMisuse;
use super::gil::guarded;

impl From<PipelineError> for PyErr {
    fn from(e: PipelineError) -> PyErr {
        SchedulerMisuse::new_err(e.to_string())
    }
}

/// (kind, pass, micro-batch, chunk for "compute" / producing stage otherwise, peer or -1)
type PyStep = (&'static str, &'static str, usize, usize, i64);

fn pass_name(p: Pass) -> &'static str {
    match p {
        Pass::Forward => "forward",
        Pass::Backward => "backward",
    }
}

fn step_tuple(s: &Step) -> PyStep {
    match *s {
        Step::Compute { pass, mb, chunk } => ("compute", pass_name(pass), mb, chunk, -1),
        Step::Send {
            pass,
            mb,
            from_stage,
            peer,
        } => ("send", pass_name(pass), mb, from_stage, peer as i64),
        Step::Recv {
            pass,
            mb,
            from_stage,
            peer,
        } => ("recv", pass_name(pass), mb, from_stage, peer as i64),
    }
}

fn built(
    kind: &str,
    ranks: usize,
    micro_batches: usize,
    virtual_stages: usize,
) -> PyResult<Schedule> {
    let kind = Kind::parse(kind)?;
    Ok(guarded("pipeline_schedule", || {
        build(kind, ranks, micro_batches, virtual_stages)
    })??)
}

/// The schedule as a dict: kind, ranks, micro_batches, chunks, stages, placement
/// (rank → chunk → stage) and steps (rank → [(kind, pass, mb, chunk or stage, peer)]).
#[pyfunction]
#[pyo3(signature = (kind, ranks, micro_batches, virtual_stages=1))]
pub fn pipeline_schedule<'py>(
    py: Python<'py>,
    kind: &str,
    ranks: usize,
    micro_batches: usize,
    virtual_stages: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let s = built(kind, ranks, micro_batches, virtual_stages)?;
    let d = PyDict::new(py);
    d.set_item("kind", s.kind.name())?;
    d.set_item("ranks", s.ranks)?;
    d.set_item("micro_batches", s.micro_batches)?;
    d.set_item("chunks", s.chunks)?;
    d.set_item("stages", s.stages)?;
    d.set_item("placement", s.placement.clone())?;
    let steps: Vec<Vec<PyStep>> = s
        .steps
        .iter()
        .map(|r| r.iter().map(step_tuple).collect())
        .collect();
    d.set_item("steps", steps)?;
    Ok(d)
}

/// Runs the schedule on a cost model: step_s, busy_s (per rank), bubble, peak_alive (per
/// rank) and messages. `forward_s` / `backward_s` give each stage's time per micro-batch.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (kind, ranks, micro_batches, forward_s, backward_s, *, virtual_stages=1,
    latency_s=0.0, transfer_s=0.0))]
pub fn pipeline_simulate<'py>(
    py: Python<'py>,
    kind: &str,
    ranks: usize,
    micro_batches: usize,
    forward_s: Vec<f64>,
    backward_s: Vec<f64>,
    virtual_stages: usize,
    latency_s: f64,
    transfer_s: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let s = built(kind, ranks, micro_batches, virtual_stages)?;
    let cost = PipeCost {
        forward_s,
        backward_s,
        latency_s,
        transfer_s,
    };
    let r = guarded("pipeline_simulate", || simulate(&s, &cost))??;
    let d = PyDict::new(py);
    d.set_item("step_s", r.step_s)?;
    d.set_item("busy_s", r.busy_s)?;
    d.set_item("bubble", r.bubble)?;
    d.set_item("peak_alive", r.peak_alive)?;
    d.set_item("messages", r.messages)?;
    Ok(d)
}
