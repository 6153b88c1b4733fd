"""Executes one pipeline rank's part of a :class:`~.schedule.Schedule`.

The engine knows nothing of the model: a :class:`StageRunner` runs a stage's forward for a
micro-batch (the first stage reads its own input, the last returns the loss). Activations and
their gradients move by non-blocking point-to-point messages over the pipeline group: a
receive is posted and waited for right before the compute that needs it (bounded by the
group's watchdog, which names the stage and the message); a send is posted right after the
compute that produced it and waited for at the end of the step, so a rank never blocks on
a send — the semantics under which the Rust simulator proved the schedule completes.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np

from moecore.autograd.tensor import Tensor
from moecore.distributed.group import Group, Request
from moecore.distributed.pipeline.schedule import Schedule

__all__ = ["PipelineEngine", "StageRunner"]


class StageRunner(Protocol):
    """What the engine calls to run the model."""

    def forward(self, stage: int, mb: int, x: Tensor | None) -> Tensor:
        """Stage ``stage``'s forward of micro-batch ``mb``: ``x`` is None on stage 0 (which
        reads the micro-batch's input itself); the last stage returns the micro-batch's
        loss (a one-element Tensor), the others their output activation."""
        ...


class PipelineEngine:
    """Runs the steps of pipeline rank ``group.rank`` of ``schedule``.

    Args:
        schedule: the step's schedule (the same on every pipeline rank).
        group: the pipeline group (its rank ``r`` is pipeline rank ``r``).
        runner: the model's stages.
        activation_shape: shape of every activation between stages (one micro-batch).
        dtype: their dtype.
    """

    def __init__(
        self,
        schedule: Schedule,
        group: Group,
        runner: StageRunner,
        activation_shape: tuple[int, ...],
        dtype: Any = np.float32,
    ) -> None:
        if group.size != schedule.ranks:
            raise ValueError(
                f"the schedule has {schedule.ranks} pipeline ranks, the group {group.size}"
            )
        self.schedule, self.group, self.runner = schedule, group, runner
        self.shape, self.dtype = tuple(activation_shape), np.dtype(dtype)
        #: Most micro-batch chunks between forward and backward at once in the last step.
        self.peak_alive = 0
        #: The last step's seconds: in all, and of each compute as (pass, stage, seconds).
        self.step_s = 0.0
        self.computes: list[tuple[str, int, float]] = []

    def run(self, loss_scale: float) -> list[tuple[int, float]]:
        """One step: every forward and backward of this rank, in the schedule's order. The
        last stage back-propagates each loss times ``loss_scale`` (``1 / micro_batches`` for
        the mean). Returns ``(micro-batch, loss)`` for the losses computed here."""
        s, rank = self.schedule, self.group.rank
        last = s.stages - 1
        # Messages for this rank, received or produced here, keyed (pass, mb, from_stage);
        # each is consumed once: by a send, or by the compute of the next stage here.
        inbox: dict[tuple[str, int, int], np.ndarray] = {}
        # (mb, chunk) → (input leaf or None, output) between forward and backward.
        alive: dict[tuple[int, int], tuple[Tensor | None, Tensor]] = {}
        sends: list[Request] = []
        losses: list[tuple[int, float]] = []
        self.peak_alive = 0
        self.computes = []
        start = time.perf_counter()
        for step in s.steps[rank]:
            t0 = time.perf_counter()
            key = (step.pass_, step.mb, step.where)
            if step.kind == "recv":
                buf = np.empty(self.shape, self.dtype)
                into = step.where + (1 if step.pass_ == "forward" else -1)
                what = (
                    f"pipeline stage {into} (pipeline rank {rank}): receiving the "
                    f"{step.pass_} message of micro-batch {step.mb} from stage {step.where} "
                    f"on pipeline rank {step.peer}"
                )
                self.group.irecv(buf, step.peer, s.tag(*key), what).wait()
                inbox[key] = buf
            elif step.kind == "send":
                buf = np.ascontiguousarray(inbox.pop(key), dtype=self.dtype)
                what = (
                    f"pipeline rank {rank}: sending the {step.pass_} message of micro-batch "
                    f"{step.mb} from stage {step.where} to pipeline rank {step.peer}"
                )
                sends.append(self.group.isend(buf, step.peer, s.tag(*key), what))
            elif step.pass_ == "forward":
                stage = s.stage_of(rank, step.where)
                x = None
                if stage > 0:
                    x = Tensor(inbox.pop(("forward", step.mb, stage - 1)), requires_grad=True)
                out = self.runner.forward(stage, step.mb, x)
                alive[(step.mb, step.where)] = (x, out)
                self.peak_alive = max(self.peak_alive, len(alive))
                if stage == last:
                    losses.append((step.mb, float(out.item())))
                else:
                    inbox[("forward", step.mb, stage)] = out.data
                self.computes.append(("forward", stage, time.perf_counter() - t0))
            else:
                stage = s.stage_of(rank, step.where)
                x, out = alive.pop((step.mb, step.where))
                if stage == last:
                    out.backward(np.full(out.shape, loss_scale, out.dtype))
                else:
                    out.backward(inbox.pop(("backward", step.mb, stage + 1)))
                if x is not None:
                    grad = x.grad if x.grad is not None else np.zeros(self.shape, self.dtype)
                    inbox[("backward", step.mb, stage)] = grad
                self.computes.append(("backward", stage, time.perf_counter() - t0))
        for req in sends:
            req.wait()
        self.step_s = time.perf_counter() - start
        if inbox or alive:
            raise RuntimeError(f"pipeline rank {rank}: the step left {list(inbox)} unused")
        return losses
