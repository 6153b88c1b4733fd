"""The communication scheduler: buckets, launch policies and transport decisions.

The work happens in moecore's Rust core (``rust/comm``); it never touches the network. Give
it the gradients (name, size, dtype, layer); during backward tell it which gradient is ready;
it answers with what to launch now and what to wait for. :class:`moecore.distributed.DataParallel`
drives it; it is usable alone (e.g. to replay a schedule)::

    from moecore.comm import GradSpec, Scheduler
    s = Scheduler([GradSpec("w0", 1000, layer=0), GradSpec("w1", 1000, layer=1)], world=4)
    s.begin_step()
    s.ready(1)        # -> [Action(kind='launch', op=0, bucket=0, ...)] once its bucket is full
    s.finish()        # launches what is left, then waits for everything

**Buckets** follow PyTorch DDP: reverse registration order, ``first_bucket_mb`` (1) for the
first bucket and ``bucket_mb`` (25) for the others, one dtype per bucket, rebuilt once (call
:meth:`Scheduler.rebuild` with rank 0's :meth:`Scheduler.observed_order` after step 0).
**Policies**: ``"fifo"`` launches buckets in bucket order as they complete; ``"priority"``
(ByteScheduler's partitioning and credit) cuts dense buckets into ``partition_mb`` parts and
keeps at most ``credit_mb`` in flight: a launch beyond it first waits for the oldest
operation. ByteScheduler's lowest-layer-first order is left out: it pays only when the next
forward may start before every gradient is averaged, and holding parts back to reorder
them left them all to :meth:`finish` (0 % of the communication hidden on loopback).
**Transport** per bucket and step: dense all-reduce, or — with ``compress_ratio`` and after
``warmup_steps`` — top-k compressed all-gather when it moves fewer bytes per rank
(``(P−1)·k·8`` against ``2·(P−1)/P·n·4``), or always with ``compress_when="always"``.

Every decision depends only on the configuration and on which buckets are complete, taken
in bucket order — never on timing — so every rank issues the same collectives in the same
order, even when some gradients never become ready (they are sent as zeros at ``finish``).
Misuse raises :class:`moecore.errors.SchedulerMisuse` (a ``ValueError``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from moecore import _core

__all__ = [
    "Action",
    "Bucket",
    "CostModel",
    "GradSpec",
    "Link",
    "Scheduler",
    "StepProfile",
    "simulate",
]

_MB = 1 << 20


@dataclass(frozen=True)
class GradSpec:
    """A gradient the scheduler knows: its name, element count, dtype and layer (0 = nearest
    the input)."""

    name: str
    numel: int
    dtype: str = "float32"
    layer: int = 0

    @property
    def elem_bytes(self) -> int:
        """Bytes per element of ``dtype``."""
        return int(np.dtype(self.dtype).itemsize)


class Action(NamedTuple):
    """What to do now: ``kind`` is ``"launch"`` (start operation ``op`` on elements
    ``offset:offset+numel`` of bucket ``bucket``'s flat buffer with ``transport``
    ``"allreduce"`` or ``"allgather"``) or ``"wait"`` (block until ``op`` completed)."""

    kind: str
    op: int
    bucket: int
    offset: int
    numel: int
    transport: str


@dataclass(frozen=True)
class Bucket:
    """Gradients sent as one flat array: ``slices`` are ``(grad index, offset, numel)``."""

    slices: tuple[tuple[int, int, int], ...]
    numel: int
    bytes: int
    dtype: str
    layer: int


def _mb(what: str, value: float) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a positive number of MiB, got {value!r}")
    if math.isinf(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return max(1, int(value * _MB))


class Scheduler:
    """Decides which collectives to launch, when, and how (see the module docstring).

    Args:
        grads: the gradients in registration order (nearest the input first).
        world: ranks the gradients are averaged over.
        bucket_mb: cap of every bucket but the first (DDP: 25).
        first_bucket_mb: cap of the first bucket (DDP: 1).
        policy: ``"fifo"`` or ``"priority"``.
        partition_mb: priority: dense buckets are cut into parts of at most this size.
        credit_mb: priority: bytes in flight at most (one operation always may be). Below
            a bucket (``bucket_mb``), a bucket's own parts wait for one another inside
            backward, with no backward between them to hide the wait: the default (64)
            holds two full buckets.
        compress_ratio: top-k density; None never compresses.
        warmup_steps: steps sent dense before compression starts.
        compress_when: ``"auto"`` (when it moves fewer bytes) or ``"always"``.
        split_layers: never let a bucket span two ``GradSpec.layer`` s (ZeRO stage 3: each
            layer's parameters are then gathered from whole buckets, split evenly).
    """

    def __init__(
        self,
        grads: Sequence[GradSpec],
        *,
        world: int,
        bucket_mb: float = 25,
        first_bucket_mb: float = 1,
        policy: str = "fifo",
        partition_mb: float = 4,
        credit_mb: float = 64,
        compress_ratio: float | None = None,
        warmup_steps: int = 0,
        compress_when: str = "auto",
        split_layers: bool = False,
    ) -> None:
        self.grads = list(grads)
        self.world = world
        self.policy = policy
        self._core = _core.CommScheduler(
            [(g.name, int(g.numel), str(np.dtype(g.dtype)), g.elem_bytes, g.layer) for g in grads],
            world=world,
            first_bucket_bytes=_mb("first_bucket_mb", first_bucket_mb),
            cap_bytes=_mb("bucket_mb", bucket_mb),
            policy=policy,
            partition_bytes=_mb("partition_mb", partition_mb),
            credit_bytes=_mb("credit_mb", credit_mb),
            compress_ratio=compress_ratio,
            warmup_steps=warmup_steps,
            compress_when=compress_when,
            split_layers=split_layers,
        )

    @property
    def step(self) -> int:
        """Steps finished so far."""
        return self._core.step

    @property
    def in_step(self) -> bool:
        """Between :meth:`begin_step` and :meth:`finish`."""
        return self._core.in_step

    @property
    def rebuilt(self) -> bool:
        """Whether the buckets were rebuilt from an observed order."""
        return self._core.rebuilt

    def buckets(self) -> list[Bucket]:
        """The current buckets, in launch order."""
        return [
            Bucket(
                slices=tuple(tuple(s) for s in b["slices"]),
                numel=b["numel"],
                bytes=b["bytes"],
                dtype=b["dtype"],
                layer=b["layer"],
            )
            for b in self._core.buckets()
        ]

    def transports(self) -> list[str]:
        """This step's transport per bucket."""
        return self._core.transports()

    def ops(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """This step's operations: ``(op, bucket, part, offset, numel, bytes, layer)``."""
        return self._core.ops()

    def begin_step(self) -> None:
        """Starts a step (fixes transports and operations)."""
        self._core.begin_step()

    def ready(self, index: int) -> list[Action]:
        """Gradient ``index`` is final for this step; returns what to do now."""
        return [Action(*a) for a in self._core.ready(index)]

    def finish(self) -> list[Action]:
        """Ends the step: unready gradients count as zeros; launches everything left and
        waits for everything in flight."""
        return [Action(*a) for a in self._core.finish()]

    def unready(self) -> list[int]:
        """Gradients not reported ready this step."""
        return self._core.unready()

    def observed_order(self) -> list[int] | None:
        """The ready order seen in step 0 (None before it finished)."""
        return self._core.observed_order()

    def rebuild(self, order: Sequence[int]) -> None:
        """Rebuilds the buckets from ``order`` (once, between steps)."""
        self._core.rebuild([int(i) for i in order])

    def describe(self) -> dict[str, Any]:
        """Buckets and settings, for logs."""
        return {
            "world": self.world,
            "policy": self.policy,
            "buckets": [(b.numel, b.dtype, b.layer) for b in self.buckets()],
        }


# --- the simulator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A link: one-way latency in seconds and bandwidth in Gbit/s."""

    latency_s: float
    gbit_per_s: float

    @property
    def bytes_per_s(self) -> float:
        """Bandwidth in bytes per second."""
        return self.gbit_per_s * 1e9 / 8


@dataclass(frozen=True)
class CostModel:
    """Two-level topology (``ranks_per_node`` consecutive ranks share a node) and the work
    each rank does for the communication: seconds per element to compress, per received
    entry to decode, per byte to copy gradients into an all-reduce's buffer, and per byte
    to fault back the released pages ZeRO stage 3 gathers into (beyond writing resident
    memory; :func:`moecore.distributed.zero.memory.refault_cost` measures it). That work
    runs on the rank's compute timeline (see :func:`simulate`)."""

    ranks_per_node: int = 1
    intra: Link = Link(5e-6, 100.0)
    inter: Link = Link(50e-6, 10.0)
    hierarchical: bool = False
    compress_s_per_elem: float = 0.0
    decode_s_per_entry: float = 0.0
    copy_s_per_byte: float = 0.0
    fault_s_per_byte: float = 0.0


@dataclass(frozen=True)
class StepProfile:
    """The compute of one step: forward, then per gradient (in the order backward finishes
    them) the compute time until it is ready, then the optimizer."""

    forward_s: float
    ready_order: tuple[int, ...]
    backward_s: tuple[float, ...]
    optimizer_s: float


def simulate(
    scheduler: Scheduler,
    profile: StepProfile,
    cost: CostModel,
    zero: int = 0,
    units: Sequence[tuple[Sequence[int], float]] = (),
) -> dict[str, Any]:
    """Predicts a steady-state step (buckets rebuilt from ``profile.ready_order``, past the
    warm-up) by replaying ``scheduler``'s own decisions on ``cost``: operations queue on one
    link and run one at a time (α–β ring model; hierarchical all-reduce when asked). It
    assumes operations progress during compute (polling thread or NCCL). The rank's own work
    for the communication is compute and delays backward: the copy of an all-reduce's
    gradients into its buffer and the compression of a compressed bucket (from the gradients
    in place), both before the launch, and the decoding of the gathered payloads when the
    rank waits for them.

    ``zero`` (1–3) simulates :class:`moecore.distributed.zero.ZeRO` of that stage instead
    of plain data parallelism: the first step's buckets (ZeRO never rebuilds them); the
    optimizer on 1/P of the elements (``profile.optimizer_s`` is the whole model's); from
    stage 2, reduce-scatters (half a ring all-reduce each, the copy into the send buffer
    before it and the addition into the shard after); stages 1–2 end with an all-gather of
    every bucket. Stage 3 needs ``units``: (gradient indices, forward seconds) per gather
    unit in forward order, the root (embeddings, head: what is outside the blocks) first,
    every gradient in one unit — their forward times replace ``profile.forward_s``. Each
    unit is gathered before its forward and again before its backward, the next unit's
    gather launched as one starts (FSDP's prefetch), straight into its parameters' released
    pages: no unpacking, but ``cost.fault_s_per_byte`` for each byte when the rank waits for
    it; no all-gather at the end.

    Returns ``step_s``, ``compute_s``, ``exposed_s`` (step minus compute), ``comm_s`` (sum
    of operation times), ``ops`` and ``compressed_buckets``."""
    return dict(
        _core.comm_simulate(
            scheduler._core,
            forward_s=profile.forward_s,
            ready_order=list(profile.ready_order),
            backward_s=list(profile.backward_s),
            optimizer_s=profile.optimizer_s,
            ranks_per_node=cost.ranks_per_node,
            intra_latency_s=cost.intra.latency_s,
            intra_bytes_per_s=cost.intra.bytes_per_s,
            inter_latency_s=cost.inter.latency_s,
            inter_bytes_per_s=cost.inter.bytes_per_s,
            hierarchical=cost.hierarchical,
            compress_s_per_elem=cost.compress_s_per_elem,
            decode_s_per_entry=cost.decode_s_per_entry,
            copy_s_per_byte=cost.copy_s_per_byte,
            fault_s_per_byte=cost.fault_s_per_byte,
            zero=zero,
            units=[(list(grads), float(fwd)) for grads, fwd in units],
        )
    )
