//! Bindings of the fused optimizer kernels.

use half::bf16;
use half::slice::HalfBitsSliceExt;
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::optim::adamw::{adamw_step as adamw_core, AdamW, AdamWError, Slot};

use super::gil::detached;

impl From<AdamWError> for PyErr {
    fn from(e: AdamWError) -> PyErr {
        PyValueError::new_err(format!("adamw_step: {e}"))
    }
}

fn writable<'py, T: numpy::Element>(
    arrays: &[Bound<'py, PyArrayDyn<T>>],
    what: &str,
) -> PyResult<Vec<PyReadwriteArrayDyn<'py, T>>> {
    arrays
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.try_readwrite().map_err(|e| {
                PyValueError::new_err(format!(
                    "adamw_step: {what}[{i}] is not writable or aliases another array: {e}"
                ))
            })
        })
        .collect()
}

/// One AdamW step over every (param, grad, exp_avg, exp_avg_sq) quadruple, in place, in one
/// parallel pass with the GIL released. All arrays float32 and C-contiguous. With
/// `compute_copies` (one bf16 array per parameter, passed as a `uint16` view), the same pass
/// also writes each updated parameter rounded to bf16 into its copy.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step, compute_copies=None))]
pub fn adamw_step(
    py: Python<'_>,
    params: Vec<Bound<'_, PyArrayDyn<f32>>>,
    grads: Vec<PyReadonlyArrayDyn<'_, f32>>,
    exp_avgs: Vec<Bound<'_, PyArrayDyn<f32>>>,
    exp_avg_sqs: Vec<Bound<'_, PyArrayDyn<f32>>>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: u64,
    compute_copies: Option<Vec<Bound<'_, PyArrayDyn<u16>>>>,
) -> PyResult<()> {
    let n = params.len();
    if compute_copies.as_ref().is_some_and(|c| c.len() != n) {
        return Err(PyValueError::new_err(format!(
            "adamw_step: got {n} params but {} compute_copies",
            compute_copies.as_ref().map_or(0, Vec::len)
        )));
    }
    if grads.len() != n || exp_avgs.len() != n || exp_avg_sqs.len() != n {
        return Err(PyValueError::new_err(format!(
            "adamw_step: got {n} params, {} grads, {} exp_avgs, {} exp_avg_sqs; all must match",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len()
        )));
    }
    let mut p = writable(&params, "params")?;
    let mut m = writable(&exp_avgs, "exp_avgs")?;
    let mut v = writable(&exp_avg_sqs, "exp_avg_sqs")?;
    let mut copies = match &compute_copies {
        Some(c) => writable(c, "compute_copies")?,
        None => Vec::new(),
    };
    let mut copy_slices: Vec<Option<&mut [bf16]>> = Vec::with_capacity(n);
    for (i, c) in copies.iter_mut().enumerate() {
        let c = c.as_slice_mut().map_err(|_| {
            PyValueError::new_err(format!(
                "adamw_step: compute_copies[{i}] must be C-contiguous"
            ))
        })?;
        copy_slices.push(Some(c.reinterpret_cast_mut::<bf16>()));
    }
    copy_slices.resize_with(n, || None);
    let mut slots = Vec::with_capacity(n);
    for (i, ((((p, g), m), v), copy)) in p
        .iter_mut()
        .zip(&grads)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
        .zip(copy_slices)
        .enumerate()
    {
        let contiguous = |what: &str| {
            PyValueError::new_err(format!("adamw_step: {what}[{i}] must be C-contiguous"))
        };
        slots.push(Slot {
            param: p.as_slice_mut().map_err(|_| contiguous("params"))?,
            grad: g.as_slice().map_err(|_| contiguous("grads"))?,
            exp_avg: m.as_slice_mut().map_err(|_| contiguous("exp_avgs"))?,
            exp_avg_sq: v.as_slice_mut().map_err(|_| contiguous("exp_avg_sqs"))?,
            compute_copy: copy,
        });
    }
    let hp = AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
    };
    detached(py, "adamw_step", || adamw_core(&hp, &mut slots))??;
    Ok(())
}
