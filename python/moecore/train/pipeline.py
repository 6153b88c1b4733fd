"""Pipeline parallelism in the trainer: ``world = pp × dp × ep`` on a
:class:`~moecore.distributed.mesh.Mesh` (pp slowest: the ``dp · ep`` consecutive ranks
``r·dp·ep …`` are pipeline rank ``r``, laid out among themselves as ``Layout``'s ``dp × ep``).

Every rank builds the whole model (same seed, same values as one process) and keeps only
its stages' parameters (:class:`~moecore.train.stage_params.StageParameters`): stage 0 the
embeddings, the last stage the final norm, the tied output layer, the MTP modules and the
loss. It runs them in the order the schedule gives
(:class:`~moecore.distributed.pipeline.PipelineEngine`). After the step each held gradient
is summed over the ranks holding its tensor — the stage's ``dp · ep`` replicas (an expert
shard's ``dp``), the first and last stage for the tied embedding, DualPipe's two copies of
a stage — and divided by ``dp · ep``: every held gradient is then the one a process gets
with ``grad_accum = micro_batches`` (up to float32 summation order). The global-norm clip
sums the squared norms over the pipeline, the non-finite skip and the router-bias update
are agreed on by the whole world, so every rank takes the same clipped optimizer step on its
own parameters and optimizer state. Under expert parallelism the MoE layers of a stage
exchange tokens among that stage's ``dp · ep`` ranks, which run the same schedule.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moecore.autograd.tensor import Tensor
from moecore.distributed import Group
from moecore.distributed.mesh import Mesh
from moecore.distributed.pipeline import PipelineEngine, schedule
from moecore.models.transformer import MoETransformer
from moecore.train.stage_params import StageParameters

__all__ = ["PipelineStep", "balance_stages"]


def balance_stages(costs: list[float], stages: int) -> list[tuple[int, int]]:
    """Cuts ``len(costs)`` consecutive layers into ``stages`` ranges ``[lo, hi)`` whose
    largest summed cost is smallest (the linear-partition dynamic program). Ranges may be
    empty when there are fewer layers than stages."""
    n = len(costs)
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    inf = float("inf")
    # best[k][i]: the smallest max-stage cost of the first i layers in k stages.
    best = np.full((stages + 1, n + 1), inf)
    cut = np.zeros((stages + 1, n + 1), dtype=np.int64)
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(n + 1):
            for j in range(i + 1):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds = []
    i = n
    for k in range(stages, 0, -1):
        bounds.append((int(cut[k][i]), i))
        i = int(cut[k][i])
    return bounds[::-1]


def profile_layers(model: MoETransformer, ids: np.ndarray, repeat: int = 3) -> list[float]:
    """Seconds of each block's forward and backward on ``ids`` (the median of ``repeat``)."""
    x = model.embed(ids).data
    out = []
    for block in model.blocks:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            h = Tensor(x, requires_grad=True)
            y = block(h)
            y.backward(np.ones_like(y.data))
            times.append(time.perf_counter() - t0)
        x = y.data
        out.append(float(np.median(times)))
    model.zero_grad()
    for layer in model.moe_layers():  # the profiling forwards are no training step
        layer._load_since_update[...] = 0
    return out


class PipelineStep:
    """One training step of this rank's pipeline stages.

    Args:
        model: the whole model as one process builds it (same seed on every rank); the
            parts other pipeline ranks run are dropped from it (:class:`StageParameters`).
        config: the run config (``pp``, ``pp_schedule``, ``virtual_stages``, ``pp_balance``,
            ``grad_accum`` = micro-batches per step, ``dp``, ``ep``).
        world: the job's group (``pp · dp · ep`` ranks).
        sample_ids: one micro-batch of token ids, for ``pp_balance = "profile"``.
    """

    def __init__(self, model: MoETransformer, config: Any, world: Group, sample_ids: Any) -> None:
        self.model, self.config, self.world = model, config, world
        self.mesh = Mesh(world, pp=config.pp, dp=config.dp, ep=config.ep)
        #: This stage's ranks (dp · ep): the layout of the expert-parallel MoE layers.
        self.stage_world = self.mesh.subgroup("dp", "ep")
        self.schedule = schedule(
            config.pp_schedule, config.pp, config.grad_accum, config.virtual_stages
        )
        n = len(model.blocks)
        if config.pp_balance == "profile":
            # Rank 0's timings for everyone: every rank must cut the model the same way.
            times = np.array(profile_layers(model, np.asarray(sample_ids)), dtype=np.float64)
            costs = [float(t) for t in world.broadcast(times, root=0)]
        else:
            costs = [1.0] * n
        self.bounds = balance_stages(costs, self.schedule.stages)
        #: Who holds what; this rank keeps only its stages' parameters from here on.
        self.params = StageParameters(model, self.mesh, self.schedule, self.bounds)
        self.rows = config.batch_size // (config.dp * config.ep)
        self.engine = PipelineEngine(
            self.schedule,
            self.mesh.group("pp"),
            self,
            (self.rows, config.seq_len, model.config.d_model),
        )
        self._batch: Any = None
        self._on_moe: Any = None

    def forward(self, stage: int, mb: int, x: Tensor | None) -> Tensor:
        """Stage ``stage`` of micro-batch ``mb`` (the :class:`StageRunner` protocol)."""
        ids, targets = self._batch(mb)
        return self._stage(stage, x, ids, targets, self._on_moe)

    def _stage(self, stage: int, x: Tensor | None, ids: Any, targets: Any, on_moe: Any) -> Tensor:
        """Stage ``stage``'s forward (the loss on the last); ``on_moe(i, layer)`` after each
        MoE layer it ran (None: not called)."""
        lo, hi = self.bounds[stage]
        h = self.model.embed(ids) if stage == 0 else x
        assert h is not None
        h = self.model.run_blocks(h, lo, hi)
        last = stage == self.schedule.stages - 1
        if last:
            h = self.model.head_loss(h, np.asarray(ids), np.asarray(targets))
        if on_moe is not None:
            prefixes = tuple(f"blocks.{b}." for b in range(lo, hi)) + (("mtp.",) if last else ())
            for i, name, layer in self.params.local_moe(self.model):
                if name.startswith(prefixes):
                    on_moe(i, layer)
        return h

    def run(self, batch: Any, on_moe: Any) -> float:
        """Runs the step: ``batch(mb)`` gives micro-batch ``mb``'s (ids, targets) of this
        rank; ``on_moe(i, layer)`` is called after MoE layer ``i``'s forward of a
        micro-batch (``i`` over the whole model). Leaves every held gradient as the
        single-process layout's (data parallel's mean convention): summed over the ranks
        holding the tensor, divided by ``dp · ep``. Returns this rank's share of the step's
        mean loss (summed over the world it is the global mean times ``dp · ep``)."""
        self._batch, self._on_moe = batch, on_moe
        m = self.config.grad_accum
        losses = self.engine.run(loss_scale=1.0 / m)
        self.params.sum_grads(self.model, 1.0 / (self.config.dp * self.config.ep))
        return sum(loss for _, loss in losses) / m

    def evaluate(self, batches: list[tuple[Any, Any]]) -> float:
        """The mean loss over ``batches`` (each run whole by every rank of a stage), the
        stages in order on their first holders, activations sent between them with
        point-to-point messages; the same number on every rank."""
        s, pp = self.schedule, self.mesh.group("pp")
        first = [min(r for r in range(s.ranks) if st in s.placement[r]) for st in range(s.stages)]
        total = np.zeros(1, np.float64)
        for k, (ids, targets) in enumerate(batches):
            x: Tensor | None = None
            shape = (*np.asarray(ids).shape, self.model.config.d_model)
            for stage, rank in enumerate(first):
                if stage > 0 and first[stage - 1] != rank:
                    tag = (k * s.stages + stage) * 2
                    if pp.rank == first[stage - 1]:
                        what = f"evaluation: sending stage {stage - 1}'s output to rank {rank}"
                        pp.isend(np.ascontiguousarray(x.data), rank, tag, what).wait()  # type: ignore[union-attr]
                    if pp.rank == rank:
                        buf = np.empty(shape, np.float32)
                        what = f"evaluation: receiving stage {stage - 1}'s output"
                        pp.irecv(buf, first[stage - 1], tag, what).wait()
                        x = Tensor(buf)
                if pp.rank == rank:
                    x = self._stage(stage, x, ids, targets, None)
            if pp.rank == first[-1]:
                total[0] += float(x.item())  # type: ignore[union-attr]
        pp.broadcast(total, root=first[-1])
        return float(total[0]) / len(batches)
