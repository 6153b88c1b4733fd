"""Pipeline schedules as data, computed by moecore's Rust core (``rust/comm/pipeline``).

:func:`schedule` gives, for each pipeline rank, the ordered steps of one training step:
``("compute", pass, mb, chunk)`` runs the forward or backward of micro-batch ``mb`` on the
rank's model chunk ``chunk``; ``("send" | "recv", pass, mb, stage, peer)`` moves the output of
stage ``stage`` for micro-batch ``mb`` (an activation when ``pass`` is ``"forward"``, its
gradient when ``"backward"``) to or from pipeline rank ``peer``. Kinds: ``"gpipe"``,
``"1f1b"`` (PipeDream-Flush), ``"interleaved"`` (Megatron-LM, ``virtual_stages`` chunks per
rank, stage ``c·p + r`` in chunk ``c`` of rank ``r``) and ``"dualpipe"`` (DeepSeek-V3: rank
``r`` holds stages ``r`` and ``p − 1 − r``; micro-batches fed from both ends). Every schedule
is checked in Rust — matched messages, inputs present before use, no cycle of waits — by
:func:`simulate`, which also predicts its step time, bubble and activations alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from moecore import _core

__all__ = ["KINDS", "Schedule", "Step", "schedule", "simulate"]

#: The schedule names ``schedule`` accepts.
KINDS = ("gpipe", "1f1b", "interleaved", "dualpipe")


class Step(NamedTuple):
    """One action: ``kind`` is ``"compute"`` (``where`` = the local chunk, ``peer`` = -1),
    ``"send"`` or ``"recv"`` (``where`` = the stage that produced the message)."""

    kind: str
    pass_: str
    mb: int
    where: int
    peer: int


@dataclass(frozen=True)
class Schedule:
    """Every pipeline rank's steps of one training step, and which stage each chunk holds."""

    kind: str
    ranks: int
    micro_batches: int
    chunks: int
    stages: int
    placement: tuple[tuple[int, ...], ...]
    steps: tuple[tuple[Step, ...], ...]

    def stage_of(self, rank: int, chunk: int) -> int:
        """The model stage chunk ``chunk`` of pipeline rank ``rank`` runs."""
        return self.placement[rank][chunk]

    def tag(self, pass_: str, mb: int, from_stage: int) -> int:
        """The MPI tag of a message: unique within a step."""
        return (mb * self.stages + from_stage) * 2 + (pass_ == "backward")


def schedule(kind: str, ranks: int, micro_batches: int, virtual_stages: int = 1) -> Schedule:
    """The ``kind`` schedule of ``ranks`` pipeline ranks and ``micro_batches`` per step.

    Raises:
        moecore.errors.SchedulerMisuse: an unknown kind, or sizes the kind does not support
            (interleaved: ``virtual_stages ≥ 2``, ``micro_batches`` a multiple of ``ranks``;
            DualPipe: even ``ranks``, even ``micro_batches ≥ 2·ranks``).
    """
    d = _core.pipeline_schedule(kind, int(ranks), int(micro_batches), int(virtual_stages))
    return Schedule(
        kind=d["kind"],
        ranks=d["ranks"],
        micro_batches=d["micro_batches"],
        chunks=d["chunks"],
        stages=d["stages"],
        placement=tuple(tuple(r) for r in d["placement"]),
        steps=tuple(tuple(Step(*s) for s in r) for r in d["steps"]),
    )


def simulate(
    kind: str,
    ranks: int,
    micro_batches: int,
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    *,
    virtual_stages: int = 1,
    latency_s: float = 0.0,
    transfer_s: float = 0.0,
) -> dict[str, Any]:
    """Runs the schedule on a cost model (per stage forward and backward seconds of one
    micro-batch; per message latency and transfer seconds) with the engine's semantics
    (sends never block, receives wait). Returns ``step_s``, ``busy_s`` (per rank),
    ``bubble`` (idle share of the step), ``peak_alive`` (per rank: most micro-batch chunks
    between forward and backward) and ``messages``."""
    return dict(
        _core.pipeline_simulate(
            kind,
            int(ranks),
            int(micro_batches),
            [float(t) for t in forward_s],
            [float(t) for t in backward_s],
            virtual_stages=int(virtual_stages),
            latency_s=float(latency_s),
            transfer_s=float(transfer_s),
        )
    )
