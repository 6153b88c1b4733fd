"""Parameters partitioned by pipeline stage.

Every rank builds the whole model from the run's seed (so the values equal one process's),
then :class:`StageParameters` drops what its pipeline rank does not run: the blocks of other
stages become :class:`StageElsewhere`, the embeddings stay on the ranks holding the first
stage (the token embedding — tied to the output layer — also on those holding the last),
the final norm and the MTP modules on those holding the last. The parameters left keep the
single-process names, so the optimizer, its state and the checkpoints speak of the same
tensors as one process does.

A tensor's *holders* are the pipeline ranks running a stage that uses it (one rank; two for
the tied embedding and for DualPipe's two copies of each stage). Its gradient is summed
over its holders × the stage's ``dp · ep`` replicas (an expert shard's over its holders ×
``dp``), and each tensor is *counted* by one rank: the first holder at ``dp = 0`` (and
``ep = 0``, but for expert shards, which every ``ep`` position counts for its own experts).
The counted tensors make the global gradient norm, the parameter checksums and a checkpoint
(each counted piece written once, in the sharded format of
:mod:`moecore.train.sharded_checkpoint`, consolidated to the single-process layout when read).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore import nn
from moecore.distributed import Group
from moecore.distributed.mesh import Mesh
from moecore.distributed.pipeline import Schedule
from moecore.optim.clip import grad_norm
from moecore.train.optimizers import decay_groups

__all__ = ["StageElsewhere", "StageParameters"]


class StageElsewhere(nn.Module):
    """Stands in for block ``block``, which pipeline ranks ``ranks`` hold (not this one)."""

    def __init__(self, block: int, ranks: tuple[int, ...]) -> None:
        super().__init__()
        self.block, self.ranks = block, ranks

    def forward(self, *args: Any) -> Any:
        """Refuses: the block's parameters are on another rank."""
        raise RuntimeError(f"block {self.block} runs on pipeline rank(s) {list(self.ranks)}")


class StageParameters:
    """Which pipeline ranks hold each tensor of ``model``; drops the others from ``model``.

    Args:
        model: the whole model, as one process builds it (changed in place).
        mesh: the job's ``pp × dp × ep`` mesh.
        schedule: the pipeline schedule (which ranks hold which stage).
        bounds: each stage's blocks ``[lo, hi)``.
    """

    def __init__(
        self, model: nn.Module, mesh: Mesh, schedule: Schedule, bounds: list[tuple[int, int]]
    ) -> None:
        self.mesh = mesh
        self.rank = mesh.coord("pp")
        last = schedule.stages - 1
        holders = [
            tuple(r for r in range(schedule.ranks) if s in schedule.placement[r])
            for s in range(schedule.stages)
        ]
        block_stage = {b: s for s, (lo, hi) in enumerate(bounds) for b in range(lo, hi)}

        def stages_using(name: str) -> set[int]:
            top, _, rest = name.partition(".")
            if top == "blocks":
                return {block_stage[int(rest.split(".")[0])]}
            return {"tok_emb": {0, last}, "pos_emb": {0}}.get(top, {last})  # norm, mtp: last

        state = model.state_dict()
        #: Single-process shape of every tensor of the state dict (experts not yet sharded).
        self.shapes = {n: tuple(v.shape) for n, v in state.items()}
        #: Name → the pipeline ranks holding it (ascending).
        self.holders = {
            n: tuple(sorted({r for s in stages_using(n) for r in holders[s]})) for n in state
        }
        names = {id(p): n for n, p in model.named_parameters()}
        groups = decay_groups(model, 0.0)
        #: Parameter names in one process's optimizer order, and its groups' sizes.
        self.param_names = [names[id(p)] for g in groups for p in g["params"]]
        self.group_sizes = [len(g["params"]) for g in groups]
        #: Learnable scalars of the whole model.
        self.num_parameters = sum(p.numel() for p in model.parameters())
        moe = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MoE)]
        #: MoE layer name → its index in depth order (over the whole model).
        self.moe_index = {n: i for i, (n, _) in enumerate(moe)}
        #: Experts of every MoE layer of the whole model, in depth order.
        self.moe_experts = [m.n_experts for _, m in moe]
        ep = mesh.size("ep")
        #: The expert shards under expert parallelism (summed over dp only).
        self.experts = (
            {f"{n}.{w}" for n in self.moe_index for w in ("w1", "w2")} if ep > 1 else set()
        )
        self._drop(model, block_stage, holders, last)
        self._groups = self._gradient_groups()

    def holds(self, name: str) -> bool:
        """Whether this pipeline rank holds tensor ``name``."""
        return self.rank in self.holders[name]

    def counts(self, name: str) -> bool:
        """Whether this rank is the one counting tensor ``name`` (see the module docstring)."""
        c = self.mesh.coords
        first = self.holders[name][0] == c["pp"] and c["dp"] == 0
        return first and (c["ep"] == 0 or name in self.experts)

    def _drop(
        self,
        model: nn.Module,
        block_stage: dict[int, int],
        holders: list[tuple[int, ...]],
        last: int,
    ) -> None:
        blocks = model._modules["blocks"]
        for b, s in block_stage.items():
            if self.rank not in holders[s]:
                blocks._modules[str(b)] = StageElsewhere(b, holders[s])
        for top in ("tok_emb", "pos_emb", "norm", "mtp"):
            owned = [n for n in self.holders if n.split(".")[0] == top]
            if owned and not self.holds(owned[0]):
                delattr(model, top)

    # -- gradients -------------------------------------------------------------------------
    def _gradient_groups(self) -> dict[tuple[tuple[int, ...], bool], Group | None]:
        """(holders, expert shard?) → the group summing such gradients (None: not a member).
        Built on every rank in the same order (the splits are collective)."""
        out: dict[tuple[tuple[int, ...], bool], Group | None] = {}
        coords = self.mesh.coords
        for key in sorted({(h, n in self.experts) for n, h in self.holders.items()}):
            ranks, expert = key
            if len(ranks) == 1:  # one pipeline rank: its stage's replicas
                mine = coords["pp"] == ranks[0]
                out[key] = (
                    (self.mesh.group("dp") if expert else self.mesh.subgroup("dp", "ep"))
                    if mine
                    else None
                )
                continue
            member = coords["pp"] in ranks
            color = (1 + (coords["ep"] if expert else 0)) if member else 0
            group = self.mesh.world.split(color, self.mesh.world.rank)
            out[key] = group if member else None
        return out

    def sum_grads(self, model: nn.Module, scale: float) -> None:
        """Every held gradient summed over the ranks holding the tensor, times ``scale``:
        one all-reduce per kind of holders, in the same order on every rank."""
        local = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for (ranks, expert), group in self._groups.items():
            if group is None:
                continue
            params = [
                p for n, p in local if self.holders[n] == ranks and (n in self.experts) == expert
            ]
            if params:
                _sum_grads(group, params, scale)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """:func:`moecore.optim.clip_grad_norm_` over the whole model: the squared norms of
        the counted gradients summed over the world (the tied embedding counted once)."""
        params = [p for _, p in model.named_parameters() if p.grad is not None]
        counted = [p for n, p in model.named_parameters() if p.grad is not None and self.counts(n)]
        squares = np.array([grad_norm(counted) ** 2], dtype=np.float64)
        self.mesh.world.allreduce(squares)
        norm = math.sqrt(float(squares[0]))
        if math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in params:
                p.grad *= p.grad.dtype.type(scale)
        return norm

    # -- whole-model views -----------------------------------------------------------------
    def checksums(self, model: nn.Module) -> dict[str, list[float]]:
        """As :func:`moecore.train.checksum.param_checksums` for the whole model: every
        tensor's Σx and Σx² from the ranks counting it, summed over the world."""
        names = list(self.shapes)
        row = {n: i for i, n in enumerate(names)}
        table = np.zeros((len(names), 2), dtype=np.float64)
        for name, value in model.state_dict().items():
            if self.counts(name):
                v = np.asarray(value).reshape(-1).astype(np.float64)
                table[row[name]] = (v.sum(), (v * v).sum())
        self.mesh.world.allreduce(table)
        return {n: [float(s), float(q)] for n, (s, q) in zip(names, table)}

    def local_moe(self, model: nn.Module) -> list[tuple[int, str, Any]]:
        """(index over the whole model, name, layer) of every MoE layer held here."""
        return [
            (self.moe_index[n], n, m) for n, m in model.named_modules() if isinstance(m, nn.MoE)
        ]

    def moe_loads(self, model: nn.Module) -> list[list[int]]:
        """Every MoE layer's tokens since its last bias update (whole model, depth order),
        from the ranks counting it (a collective over the world)."""
        table = [np.zeros(n, np.int64) for n in self.moe_experts]
        for i, name, layer in self.local_moe(model):
            if self.counts(f"{name}.expert_bias"):
                table[i][...] = layer._load_since_update
        flat = np.concatenate(table) if table else np.zeros(0, np.int64)
        self.mesh.world.allreduce(flat)
        return [part.tolist() for part in np.split(flat, np.cumsum(self.moe_experts)[:-1])]

    def sum_moe_loads(self, model: nn.Module) -> None:
        """Each held MoE layer's tokens since its last bias update summed over the world
        (one all-reduce; zeros for the layers a rank does not hold), as under data
        parallelism: the router-bias update then sees the whole step's counts."""
        offsets = np.concatenate([[0], np.cumsum(self.moe_experts)]).astype(np.int64)
        flat = np.zeros(int(offsets[-1]), np.int64)
        layers = self.local_moe(model)
        for i, _, layer in layers:
            flat[offsets[i] : offsets[i + 1]] = layer._load_since_update
        self.mesh.world.allreduce(flat)
        for i, _, layer in layers:
            layer._load_since_update[...] = flat[offsets[i] : offsets[i + 1]]

    # -- checkpoints -----------------------------------------------------------------------
    def owned(self, model: nn.Module, optimizer: Any, ep_rank: int) -> list[Any]:
        """What this rank writes of a sharded checkpoint (the tensors it counts, buffers
        included, with their optimizer state): (name, first element in the single-process
        flat tensor, values, optimizer state)."""
        params = {n for n, _ in model.named_parameters()}
        out: list[Any] = []
        for name, p in model.named_parameters():
            if self.counts(name):
                base = ep_rank * p.data.size if name in self.experts else 0
                out.append((name, base, p.data, optimizer.state.get(id(p), {})))
        for name, value in model.state_dict().items():
            if name not in params and self.counts(name):
                out.append((name, 0, value, {}))
        return out

    def checkpoint_layout(self, hyper: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
        """(the sharded checkpoint's layout, its optimizer param_groups in one process's
        numbering) from the optimizer groups' hyper-parameters ``hyper``."""
        params = set(self.param_names)
        layout = {
            "world": self.mesh.world.size,
            "pp": self.mesh.size("pp"),
            "dp": self.mesh.size("dp"),
            "ep": self.mesh.size("ep"),
            "zero": 0,
            "params": [[n, list(self.shapes[n])] for n in self.param_names],
            "buffers": [[n, list(s)] for n, s in self.shapes.items() if n not in params],
        }
        # A rank without norms (no block here) has no second group: its hyper-parameters
        # are the first's without weight decay, as decay_groups makes them.
        hyper = [
            *hyper,
            *[{**hyper[0], "weight_decay": 0.0}] * (len(self.group_sizes) - len(hyper)),
        ]
        groups, start = [], 0
        for h, size in zip(hyper, self.group_sizes):
            groups.append({**h, "params": list(range(start, start + size))})
            start += size
        return layout, groups


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
    for p in params:  # views of the summed buffer (disjoint): no second copy of the grads
        n = p.numel()
        p.grad = flat[offset : offset + n].reshape(p.shape)
        offset += n
