"""How a training job spreads over its ranks: ``world = dp × ep``.

Rank ``r`` belongs to the expert-parallel group ``r // ep`` (``ep`` consecutive ranks that
share the experts of every MoE layer through all-to-all) at position ``r % ep``, and to the
expert-data-parallel group ``r % ep`` (the ``dp`` ranks holding the same experts). Every rank
takes its own rows of the global batch. Gradients of replicated parameters (everything but
the routed experts) are averaged over the world; an expert's gradient already sums the
contributions of its expert-parallel group, so it is averaged over its expert-data-parallel
group and divided by ``ep`` — together exactly the gradient of the global batch's mean loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from moecore import nn, optim
from moecore.distributed import DataParallel, ExpertParallelMoE, Group
from moecore.distributed.zero import ShardedOptimizer, ZeRO
from moecore.optim.clip import grad_norm
from moecore.train.rss import rss_record

__all__ = ["Layout"]


class _Subset:
    """The part of a model's parameters one :class:`DataParallel` takes care of."""

    def __init__(self, named: list[tuple[str, Any]]) -> None:
        self._named = named

    def named_parameters(self) -> list[tuple[str, Any]]:
        """The parameters, with their names in the model."""
        return list(self._named)


class Layout:
    """The groups of a ``dp × ep`` job and what the trainer does with them.

    Args:
        world: the job's group (size ``dp · ep``).
        ep: expert-parallel ranks (1: plain data parallelism).
        zero: ZeRO stage (0: none): replicated parameters sharded over the world, an
            expert's over its expert-data-parallel group (the ranks holding it).
        reduce_gradients: False when someone else sums the gradients (the pipeline step of
            ``train/pipeline.py``): :meth:`data_parallel` then wraps nothing.
    """

    def __init__(self, world: Group, ep: int, zero: int = 0, reduce_gradients: bool = True) -> None:
        if world.size % ep:
            raise ValueError(f"the job's {world.size} ranks are not a multiple of ep={ep}")
        self.world, self.ep, self.zero = world, ep, zero
        self.reduce_gradients = reduce_gradients
        self.dp = world.size // ep
        if ep > 1:
            self.ep_group = world.split(world.rank // ep)
            self.expert_dp_group = world.split(world.rank % ep)
        else:
            self.ep_group = self.expert_dp_group = None  # type: ignore[assignment]
        self.dense: DataParallel | None = None
        self.experts: DataParallel | None = None
        #: Parameter name in the model → the expert-parallel layer whose shard it is.
        self.sharded: dict[str, ExpertParallelMoE] = {}

    # -- building --------------------------------------------------------------------------
    def shard_model(self, model: nn.Module) -> None:
        """Replaces every :class:`moecore.nn.MoE` of ``model`` (built identically on every
        rank) by this rank's :class:`ExpertParallelMoE` shard; nothing when ep = 1."""
        if self.ep == 1:
            return
        for name, module in list(model.named_modules()):
            for child_name, child in list(module._modules.items()):
                if isinstance(child, nn.MoE) and not isinstance(child, ExpertParallelMoE):
                    layer = ExpertParallelMoE.from_moe(child, self.ep_group, self.world)
                    setattr(module, child_name, layer)
                    prefix = f"{name}.{child_name}" if name else child_name
                    self.sharded[f"{prefix}.w1"] = layer
                    self.sharded[f"{prefix}.w2"] = layer

    def data_parallel(self, model: nn.Module, **kwargs: Any) -> None:
        """Gradient averaging: replicated parameters over the world, experts over their
        expert-data-parallel group (``kwargs`` go to :class:`DataParallel`). Calling it
        again replaces the previous ones (their hooks removed)."""
        for old in (self.dense, self.experts):  # rebuilding (e.g. on resume)
            if old is not None:
                old.remove_hooks()
        self.dense = self.experts = None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dense = [(n, p) for n, p in named if n not in self.sharded]
        experts = [(n, p) for n, p in named if n in self.sharded]
        if self.zero:
            kwargs = {**kwargs, "stage": self.zero}
        if self.zero == 3:
            # Stage 3 gathers block by block: both ZeROs take their units from the model's
            # blocks (each restricted to its own parameters) and hook the same forwards.
            kwargs["module"] = model
        cls: Any = ZeRO if self.zero else DataParallel
        if self.world.size > 1 and self.reduce_gradients:
            self.dense = cls(_Subset(dense), self.world, **kwargs)
        if experts and self.dp > 1 and self.reduce_gradients:
            self.experts = cls(_Subset(experts), self.expert_dp_group, **kwargs)
        self._expert_params = [p for _, p in experts]
        self._dense_params = [p for _, p in dense]

    def moe_layers(self, model: nn.Module) -> list[Any]:
        """The MoE layers of ``model`` (sharded or not), in depth order."""
        return [m for m in model.modules() if isinstance(m, nn.MoE)]  # sharded ones too

    def num_parameters(self, model: nn.Module) -> int:
        """Learnable scalars of the whole model (every rank's experts counted)."""
        local = sum(p.numel() for p in model.parameters())
        return local + (self.ep - 1) * sum(p.numel() for p in self._expert_params)

    # -- every step ------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients locally."""
        with contextlib.ExitStack() as stack:
            for dp in (self.dense, self.experts):
                if dp is not None:
                    stack.enter_context(dp.no_sync())
            yield

    def finish(self) -> None:
        """Waits for the averaged gradients and puts the experts' on the same footing."""
        for dp in (self.dense, self.experts):
            if dp is not None:
                dp.finish()
        if self.ep > 1 and self.reduce_gradients:
            inv = np.float32(1.0 / self.ep)
            for p in self._expert_params:
                if p.grad is not None:
                    p.grad *= inv
            if isinstance(self.experts, ZeRO) and self.experts.stage >= 2:
                self.experts.scale_grads(1.0 / self.ep)  # stage 2 keeps no whole gradient

    def clip_grad_norm_(self, max_norm: float) -> float:
        """:func:`moecore.optim.clip_grad_norm_` over the whole (sharded) model: the norm of
        the replicated gradients and of every rank's experts, the same on every rank."""
        if self._zeros():
            return self._clip_sharded(max_norm)
        if self.ep == 1:
            return optim.clip_grad_norm_(self._dense_params, max_norm)
        dense = [p for p in self._dense_params if p.grad is not None]
        experts = [p for p in self._expert_params if p.grad is not None]
        squares = np.array([grad_norm(experts) ** 2], dtype=np.float64)
        self.ep_group.allreduce(squares)
        norm = math.sqrt(grad_norm(dense) ** 2 + float(squares[0]))
        if math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in dense + experts:
                p.grad *= p.grad.dtype.type(scale)
        return norm

    @contextlib.contextmanager
    def full_params(self, writeback: bool = False) -> Iterator[None]:
        """Every parameter whole inside (ZeRO stage 3 holds parts at rest); with
        ``writeback`` the values found there become the ranks' parts (loading)."""
        with contextlib.ExitStack() as stack:
            for z in self._zeros():
                stack.enter_context(z.gathered(writeback))
            yield

    def _zeros(self) -> list[ZeRO]:
        return [z for z in (self.dense, self.experts) if isinstance(z, ZeRO)]

    def _clip_sharded(self, max_norm: float) -> float:
        """The global norm from each rank's owned gradient elements (plus the experts no
        ZeRO shards, dp = 1: each on one rank only), summed over the world."""
        whole = [] if self.experts is not None else self._expert_params
        whole = [p for p in whole if p.grad is not None]
        squares = np.array(
            [sum(z.grad_square_sum() for z in self._zeros()) + grad_norm(whole) ** 2]
        )
        self.world.allreduce(squares)
        norm = math.sqrt(float(squares[0]))
        if math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for z in self._zeros():
                z.scale_grads(scale)
            for p in whole:
                p.grad *= p.grad.dtype.type(scale)
        return norm

    def shard_optimizer(self, optimizer: optim.Optimizer) -> optim.Optimizer:
        """``optimizer`` (over the whole parameters, or a previous wrapping of it) as this
        rank updates it: over its ZeRO pieces, or as it is without ZeRO."""
        if isinstance(optimizer, ShardedOptimizer):
            optimizer = optimizer.full
        zeros = self._zeros()
        return ShardedOptimizer(optimizer, zeros) if zeros else optimizer

    def state_bytes(self, optimizer: optim.Optimizer) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state."""
        params = sum(p.data.nbytes for p in self._dense_params + self._expert_params)
        grads = sum(p.data.nbytes for p in self._dense_params + self._expert_params)
        if self._zeros():
            zs = self._zeros()
            params = sum(z.state_bytes()["param_bytes"] for z in zs)
            grads = sum(z.state_bytes()["grad_bytes"] for z in zs)
            if self.experts is None:  # experts no ZeRO takes care of
                params += sum(p.data.nbytes for p in self._expert_params)
                grads += sum(p.data.nbytes for p in self._expert_params)
        inner = optimizer.inner if isinstance(optimizer, ShardedOptimizer) else optimizer
        state = sum(
            v.nbytes for st in inner.state.values() for v in st.values() if hasattr(v, "nbytes")
        )
        return {"param_bytes": params, "grad_bytes": grads, "optimizer_bytes": state}

    def memory_record(
        self, optimizer: optim.Optimizer, group: Group | None = None
    ) -> dict[str, list[float]]:
        """Every rank's bytes of parameters, gradients and optimizer state, and its peak
        RSS in MiB, as lists in rank order (a collective over ``group``, by default the
        layout's world: an all-gather of 4 numbers)."""
        group = self.world if group is None else group
        mine = self.state_bytes(optimizer)
        peak = rss_record().get("peak_rss_mb", float("nan"))
        keys = ("param_bytes", "grad_bytes", "optimizer_bytes")
        send = np.array([*(float(mine[k]) for k in keys), peak], dtype=np.float64)
        out = np.empty((group.size, 4), dtype=np.float64)
        group.allgather(send, out)
        record: dict[str, list[float]] = {
            f"rank_{k}": [int(v) for v in out[:, i]] for i, k in enumerate(keys)
        }
        record["rank_peak_rss_mb"] = [float(v) for v in out[:, 3]]
        return record

    # -- checkpoints ---------------------------------------------------------------------
    def owned(self, model: nn.Module, optimizer: optim.Optimizer) -> list[Any]:
        """Under ZeRO, what this rank writes of a sharded checkpoint: (parameter name,
        first element in the single-process flat tensor, values, their optimizer state)
        for every piece it owns (and the experts no ZeRO holds, dp = 1: its own, whole).
        Every element of the model is owned by exactly one rank."""
        names = {id(p): n for n, p in model.named_parameters()}
        inner = optimizer.inner if isinstance(optimizer, ShardedOptimizer) else optimizer
        ep_pos = self.ep_group.rank if self.ep > 1 else 0
        out: list[Any] = []
        for z in self._zeros():
            for piece in z.pieces:
                p = z.params[piece.index]
                name = names[id(p)]
                base = ep_pos * p.data.size if name in self.sharded else 0
                state = inner.state.get(id(piece.tensor), {})
                out.append((name, base + piece.start, piece.tensor.data, state))
        if self.experts is None:
            for p in self._expert_params:
                state = inner.state.get(id(p), {})
                out.append((names[id(p)], ep_pos * p.data.size, p.data, state))
        return out

    def sharded_layout(self, model: nn.Module, names: list[str]) -> dict[str, Any]:
        """What a sharded checkpoint records of the layout: world, dp, ep, stage, and every
        parameter's name and single-process shape, in ``names``' (the optimizer's) order."""
        shapes = {n: list(p.data.shape) for n, p in model.named_parameters()}
        for name in self.sharded:
            shapes[name][0] *= self.ep
        params = [[n, shapes[n]] for n in names]
        return {
            "world": self.world.size,
            "dp": self.dp,
            "ep": self.ep,
            "zero": self.zero,
            "params": params,
        }

    def sharded_checkpoints(self) -> bool:
        """Whether each rank writes its own part of a checkpoint (ZeRO on several ranks)."""
        return bool(self._zeros())

    # -- checkpoints -----------------------------------------------------------------------
    def gather(self, name: str, local: np.ndarray) -> np.ndarray:
        """The full (all experts) tensor of sharded parameter ``name`` from this rank's
        shard; a collective over the expert-parallel group. Other names: ``local``."""
        if name not in self.sharded:
            return local
        local = np.ascontiguousarray(local)
        out = np.empty((self.ep, *local.shape), dtype=local.dtype)
        self.ep_group.allgather(local, out)
        return out.reshape(self.ep * local.shape[0], *local.shape[1:])

    def shard(self, name: str, full: np.ndarray) -> np.ndarray:
        """This rank's rows of the full tensor of sharded parameter ``name`` (others: as
        they are)."""
        if name not in self.sharded:
            return full
        n = full.shape[0] // self.ep
        lo = self.ep_group.rank * n
        return np.ascontiguousarray(full[lo : lo + n])
