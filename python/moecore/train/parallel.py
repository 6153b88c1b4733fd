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

from moecore import nn
from moecore.distributed import DataParallel, ExpertParallelMoE, Group
from moecore.optim.clip import grad_norm

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
        reduce_gradients: False when someone else sums the gradients (the pipeline step of
            ``train/pipeline.py``): :meth:`data_parallel` then wraps nothing.
    """

    def __init__(self, world: Group, ep: int, reduce_gradients: bool = True) -> None:
        if world.size % ep:
            raise ValueError(f"the job's {world.size} ranks are not a multiple of ep={ep}")
        self.world, self.ep, self.reduce_gradients = world, ep, reduce_gradients
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
        if self.world.size > 1 and self.reduce_gradients:
            self.dense = DataParallel(_Subset(dense), self.world, **kwargs)
        if experts and self.dp > 1 and self.reduce_gradients:
            self.experts = DataParallel(_Subset(experts), self.expert_dp_group, **kwargs)
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

    def clip_grad_norm_(self, max_norm: float) -> float:
        """:func:`moecore.optim.clip_grad_norm_` over the whole (sharded) model: the norm of
        the replicated gradients and of every rank's experts, the same on every rank."""
        if self.ep == 1:
            from moecore.optim import clip_grad_norm_

            return clip_grad_norm_(self._dense_params, max_norm)
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
