"""Pipeline parallelism in the trainer: ``world = pp × dp × ep`` on a
:class:`~moecore.distributed.mesh.Mesh` (pp slowest: the ``dp · ep`` consecutive ranks
``r·dp·ep …`` are pipeline rank ``r``, laid out among themselves as ``Layout``'s ``dp × ep``).

Every rank builds the whole model (same seed, same parameters) and runs only its stages'
layers — stage 0 the embeddings, the last stage the final norm, the tied output layer and
the loss — in the order the schedule gives (:class:`~moecore.distributed.pipeline.PipelineEngine`).
After the step one all-reduce over the world sums every replicated gradient: over the
pipeline ranks it assembles the whole gradient (each parameter's comes from the stages that
use it; the tied embedding's from the first and the last stage, DualPipe's two copies of a
stage from their two ranks), over the data-parallel (and expert-parallel) ranks it sums the
replicas, divided by ``dp · ep``; the experts' shards are summed the same way over the
``pp · dp`` ranks that hold them. Under expert parallelism the MoE layers of a stage
exchange tokens among that stage's ``dp · ep`` ranks, which run the same schedule.
Every rank then holds the gradient one process gets with ``grad_accum = micro_batches`` (up
to float32 summation order) and takes the same clipped optimizer step, so checkpoints,
clipping, the non-finite skip and the router-bias update are those of the single-process
run. (Memory: every rank keeps every parameter and its optimizer state — only activations
are split; sharding the parameters by stage is left to do.)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moecore import nn
from moecore.autograd.tensor import Tensor
from moecore.distributed import Group
from moecore.distributed.mesh import Mesh
from moecore.distributed.pipeline import PipelineEngine, schedule
from moecore.models.transformer import MoETransformer

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
        model: the whole model (identical on every rank).
        config: the run config (``pp``, ``pp_schedule``, ``virtual_stages``, ``pp_balance``,
            ``grad_accum`` = micro-batches per step, ``dp``).
        world: the job's group (``pp · dp`` ranks).
        sample_ids: one micro-batch of token ids, for ``pp_balance = "profile"``.
    """

    def __init__(self, model: MoETransformer, config: Any, world: Group, sample_ids: Any) -> None:
        self.model, self.config, self.world = model, config, world
        self.mesh = Mesh(world, pp=config.pp, dp=config.dp, ep=config.ep)
        #: This stage's ranks (dp · ep): the layout of the expert-parallel MoE layers.
        self.stage_world = self.mesh.subgroup("dp", "ep")
        #: The ranks holding the same experts, over every stage (pp · dp).
        self.expert_world = self.mesh.subgroup("pp", "dp")
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
        blocks_moe = [isinstance(b.ffn, nn.MoE) for b in model.blocks]
        # MoE layer index (depth order) of each block, for the per-stage routing statistics.
        self._moe_index = {b: i for i, b in enumerate(j for j, m in enumerate(blocks_moe) if m)}
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
        lo, hi = self.bounds[stage]
        h = self.model.embed(ids) if stage == 0 else x
        assert h is not None
        h = self.model.run_blocks(h, lo, hi)
        for b in range(lo, hi):
            if b in self._moe_index:
                self._on_moe(self._moe_index[b], self.model.blocks[b].ffn)
        if stage == self.schedule.stages - 1:
            return self.model.head(h, targets)
        return h

    def run(self, batch: Any, on_moe: Any, sharded: set[str]) -> float:
        """Runs the step: ``batch(mb)`` gives micro-batch ``mb``'s (ids, targets) of this
        rank; ``on_moe(i, layer)`` is called after MoE layer ``i``'s forward of a
        micro-batch. Leaves every gradient as the single-process layout's (data parallel's
        mean convention): replicated parameters summed over the world, expert shards (the
        parameter names in ``sharded``) over the ranks holding them, both divided by
        ``dp · ep``. Returns this rank's share of the step's mean loss (summed over the world
        it is the global mean times ``dp · ep``)."""
        self._batch, self._on_moe = batch, on_moe
        m = self.config.grad_accum
        losses = self.engine.run(loss_scale=1.0 / m)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        replicas = self.config.dp * self.config.ep
        for group, params in (
            (self.world, [p for n, p in named if n not in sharded]),
            (self.expert_world, [p for n, p in named if n in sharded]),
        ):
            if params:
                _sum_grads(group, params, 1.0 / replicas)
        return sum(loss for _, loss in losses) / m


def _sum_grads(group: Group, params: list[Any], scale: float) -> None:
    """Every parameter's gradient (zero where this rank has none) summed over ``group``
    in one all-reduce, times ``scale``."""
    flat = np.concatenate(
        [
            (p.grad if p.grad is not None else np.zeros(p.shape, np.float32))
            .reshape(-1)
            .astype(np.float32)
            for p in params
        ]
    )
    group.allreduce(flat)
    if scale != 1.0:
        flat *= np.float32(scale)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].reshape(p.shape).copy()
        offset += n
