"""The run's ``dtype`` wired into the trainer: compute copies of the weights, rounded
activations, and fp16's loss scaling (the pieces: :mod:`moecore.nn.precision`,
:mod:`moecore.optim.master_weights`, :mod:`moecore.optim.loss_scaler`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from moecore import nn
from moecore.autograd.tensor import Tensor
from moecore.kernels.lowp import COMPUTE_DTYPES
from moecore.nn.precision import apply_precision, bf16_storage, compute_copy_fn
from moecore.optim.loss_scaler import LossScaler
from moecore.optim.master_weights import MasterWeights
from moecore.train.hpts import HPTSScheduler


def stores_bf16(config: Any) -> bool:
    """Whether a run stores its weights' compute copies and activations as real
    ``ml_dtypes.bfloat16`` arrays: a bf16 run without HPTS. HPTS's per-group formats (fp16
    and float32 among them) do not fit bf16 storage, and fp16 and fp8 have no fast numpy or
    kernel path here: those runs keep float32 arrays holding the format's values."""
    return bool(config.dtype == "bf16" and config.precision_schedule != "hpts")


class RunPrecision:
    """What ``config.dtype`` changes in a step.

    Args:
        model: the (sharded) model; its forwards are wrapped (:func:`apply_precision`).
        config: the run config (``dtype``, ``loss_scale_init``, ``loss_scale_growth_interval``).
        residual: module types whose output is the residual stream.
    """

    def __init__(
        self, model: nn.Module, config: Any, residual: tuple[type[nn.Module], ...] = ()
    ) -> None:
        self.dtype_name = config.dtype
        hpts = config.precision_schedule == "hpts"
        #: Real bf16 arrays between ops (:func:`stores_bf16`).
        self.storage = stores_bf16(config)
        apply_precision(model, config.dtype, residual, storage=self.storage)
        #: ``precision_schedule = "hpts"``: the sensitive groups' formats, step by step.
        self.hpts = HPTSScheduler(model, config.hpts_threshold) if hpts else None
        self.masters = MasterWeights(
            model.parameters(),
            COMPUTE_DTYPES[config.dtype],
            compute_copy_fn(
                model,
                config.dtype,
                self.hpts.scheduled if self.hpts else None,
                storage=self.storage,
            ),
        )
        self._hpts_ran: dict[str, str] = {}
        self.scaler = (
            LossScaler(
                init_scale=config.loss_scale_init,
                growth_interval=config.loss_scale_growth_interval,
            )
            if config.dtype == "fp16"
            else None
        )

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Forward and backward run inside: the parameters hold their compute copies. Under
        fp16, overflow to inf is expected (the loss scaler detects it and skips the step), so
        numpy's overflow and invalid-value warnings are off inside."""
        quiet = (
            np.errstate(over="ignore", invalid="ignore")
            if self.scaler is not None
            else contextlib.nullcontext()
        )
        storing = bf16_storage() if self.storage else contextlib.nullcontext()
        with self.masters.compute_copies(), quiet, storing:
            yield

    def scaled(self, loss: Tensor) -> Tensor:
        """The loss to call ``backward`` on: times the loss scale under fp16."""
        return loss if self.scaler is None else loss * self.scaler.scale

    def unscale_(self, params: list[Tensor]) -> None:
        """Divides the gradients by the loss scale (fp16), before clipping. Whether they
        overflowed is decided from the global gradient norm (:meth:`overflowed`), the same
        on every rank."""
        if self.scaler is not None:
            self.scaler.unscale_(params)
        if self.hpts is not None:
            self._hpts_ran = self.hpts.observe()

    def overflowed(self, grad_norm: float) -> bool | None:
        """fp16: whether this step's gradients overflowed (the step is then skipped, and is
        not a bad step for the monitor), updating the scale; None without a loss scaler."""
        if self.scaler is None:
            return None
        found_inf = not math.isfinite(grad_norm)
        self.scaler.update(found_inf)
        return found_inf

    def record(self) -> dict[str, Any]:
        """The step's metrics: the loss scale after the update (fp16), the formats the
        sensitive groups ran in (HPTS)."""
        out: dict[str, Any] = {}
        if self.scaler is not None:
            out["loss_scale"] = self.scaler.scale
        if self.hpts is not None:
            out["hpts"] = self._hpts_ran
        return out

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints (the loss scaler's state; the weights are the float32 masters)."""
        out: dict[str, Any] = {}
        if self.scaler is not None:
            out["loss_scaler"] = self.scaler.state_dict()
        if self.hpts is not None:
            out["hpts"] = self.hpts.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; a checkpoint of another dtype restores nothing
        (a run resumed in fp16 from bf16 starts its loss scale afresh)."""
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])
        if self.hpts is not None and "hpts" in state:
            self.hpts.load_state_dict(state["hpts"])
