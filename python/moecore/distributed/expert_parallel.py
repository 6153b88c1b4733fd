"""Expert parallelism: the experts of an MoE layer spread over the ranks of a group.

Every rank routes its own tokens with the (replicated) router, then *dispatches* each token
row to the rank holding its expert with an all-to-all-v (the per-expert counts go first, so
every rank knows what it receives), runs its local experts, and *combines* the results back
with the reverse all-to-all-v. In backward the roles swap: the output gradient is
dispatched, the input gradient combined.

Gradients follow the data-parallel convention (each rank's loss is the mean over its own
tokens, replicated gradients are *averaged* over the ``stats_group``): the router (and any
shared experts) are replicated parameters — average them over that group; the local
experts' gradients hold the contributions of every rank of the expert-parallel group, so
they are complete up to that convention's factor (sum them over the ranks that hold the
same experts and divide by the ``stats_group`` size; :class:`moecore.train.parallel.Layout`
does all this for the trainer).

The Switch load-balancing loss uses the dispatch fractions and mean router probabilities of
the whole ``stats_group`` (one all-reduce of 2·E+1 numbers per layer and step), so its
value and gradient equal those of one process holding every token.

The layer is :class:`moecore.nn.MoE` with its experts sharded: the MoE op
(:func:`moecore.ops.moe`) does the routing, the expert FFN, the auxiliary losses and their
gradients; this module adds only the exchange the op calls between routing and experts
(:class:`AllToAllExchange`) and hands it the ``stats_group``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from moecore.distributed.group import Group
from moecore.nn.module import Module
from moecore.nn.moe import MoE
from moecore.nn.parameter import Parameter

__all__ = ["AllToAllExchange", "ExpertParallelMoE"]

#: What a shard takes over from the full layer unchanged (constructor keywords).
_ROUTING_CONFIG = (
    "top_k",
    "score",
    "activation",
    "aux_loss",
    "z_loss",
    "bias_update_rate",
    "n_groups",
    "topk_groups",
    "seq_aux_loss",
    "routed_scale",
)


class _AllToAllPlan:
    """Who sends which rows where, for one routing: built from this rank's rows per expert
    (``counts``, length E = size × local experts) after exchanging the counts."""

    def __init__(self, group: Group, counts: np.ndarray, n_local: int) -> None:
        self.group = group
        by_rank = np.ascontiguousarray(counts.reshape(group.size, n_local), dtype=np.int64)
        self.send_counts = by_rank.sum(axis=1)
        # recv[s, j]: rows source rank s sends for local expert j.
        self.recv = np.empty_like(by_rank)
        group.alltoall(by_rank, self.recv)
        self.recv_counts = self.recv.sum(axis=1)
        self.local_counts = self.recv.sum(axis=0).astype(counts.dtype)
        # Received rows come source-major, each source's block expert-major; the experts
        # want expert-major, source-minor: perm[i] = received row at local position i.
        src_start = np.concatenate([[0], np.cumsum(self.recv_counts)[:-1]])
        blocks = []
        for j in range(n_local):
            for s in range(group.size):
                start = src_start[s] + self.recv[s, :j].sum()
                blocks.append(np.arange(start, start + self.recv[s, j], dtype=np.int64))
        self.perm = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)

    def dispatch(self, rows: np.ndarray) -> np.ndarray:
        """Rows in this rank's expert-sorted order → the rows of the local experts."""
        got, _ = self.group.alltoallv(np.ascontiguousarray(rows), self.send_counts)
        return np.ascontiguousarray(got[self.perm])

    def combine(self, rows: np.ndarray) -> np.ndarray:
        """The reverse of :meth:`dispatch`."""
        back = np.empty_like(rows)
        back[self.perm] = rows
        out, _ = self.group.alltoallv(back, self.recv_counts)
        return out


class AllToAllExchange:
    """The :class:`moecore.ops.moe.ExpertExchange` of expert parallelism over ``group``:
    rank r holds global experts ``[r·n_local, (r+1)·n_local)``; rows travel with
    all-to-all-v, the per-expert counts first so every rank knows what it receives."""

    def __init__(self, group: Group, n_local: int) -> None:
        self.group, self.n_local = group, n_local

    def plan(self, counts: Any) -> _AllToAllPlan:
        """Exchanges the counts (a collective) and returns the plan of this routing."""
        return _AllToAllPlan(self.group, np.asarray(counts), self.n_local)


class ExpertParallelMoE(MoE):
    """An MoE layer whose routed experts are spread over ``group``: ``n_experts / size`` per
    rank, rank r holding global experts ``[r·E/P, (r+1)·E/P)`` (``w1[j]`` is expert
    ``r·E/P + j``). Router, router bias and shared experts are replicated.

    It is a :class:`moecore.nn.MoE` (same forward, :meth:`update_bias`, auxiliary losses
    and ``aux_loss_scale``) whose ``exchange`` moves token rows over ``group`` and whose
    ``stats_group`` sums the Switch loss's statistics.

    Build it from a full :class:`moecore.nn.MoE` (identical on every rank, e.g. same seed)
    with :meth:`from_moe`. Supported: softmax/sigmoid scores, group-limited routing, the
    Switch aux loss and z-loss (``stats_group``-wide, see the module docstring), the
    aux-loss-free router bias (:meth:`update_bias` with the load summed over the ranks),
    shared experts. Not supported: capacity dropping (the per-expert capacity of one
    process holding every token would need a global ranking of the assignments).

    Args:
        router: ``[E, d]`` replicated router weights.
        w1: ``[E/P, d, h]`` local experts' first matrices; w2: ``[E/P, h, d]``.
        group: the expert-parallel group (the all-to-all goes over it).
        stats_group: the ranks whose tokens make up one batch (the whole job; default
            ``group``): the aux loss uses its summed routing counts.
        expert_bias: ``[E]`` initial router bias (aux-loss-free balancing).
        shared_in, shared_out: the shared experts' two :class:`~moecore.nn.Linear` layers.
    """

    def __init__(
        self,
        router: np.ndarray,
        w1: np.ndarray,
        w2: np.ndarray,
        group: Group,
        top_k: int = 2,
        score: str = "softmax",
        activation: str = "gelu",
        *,
        stats_group: Group | None = None,
        aux_loss: float = 0.0,
        z_loss: float = 0.0,
        bias_update_rate: float = 0.0,
        expert_bias: np.ndarray | None = None,
        n_groups: int | None = None,
        topk_groups: int | None = None,
        shared_in: Module | None = None,
        shared_out: Module | None = None,
        seq_aux_loss: float = 0.0,
        routed_scale: float = 1.0,
    ) -> None:
        Module.__init__(self)  # the weights come from the caller, not MoE's initialisers
        e = router.shape[0]
        if e % group.size:
            raise ValueError(f"{e} experts cannot be split over {group.size} ranks")
        if w1.shape[0] != e // group.size or w2.shape[0] != e // group.size:
            raise ValueError(
                f"each rank holds {e // group.size} experts; got w1 {w1.shape}, w2 {w2.shape}"
            )
        if (shared_in is None) != (shared_out is None):
            raise ValueError("shared_in and shared_out go together")
        self._configure(
            [],
            router.shape[1],
            w2.shape[1],
            e,
            top_k=top_k,
            score=score,
            capacity_factor=None,
            aux_loss=aux_loss,
            z_loss=z_loss,
            bias_update_rate=bias_update_rate,
            n_shared_experts=0 if shared_in is None else 1,
            n_groups=n_groups,
            topk_groups=topk_groups,
            activation=activation,
            expert_bias=expert_bias,
            seq_aux_loss=seq_aux_loss,
            routed_scale=routed_scale,
        )
        self.router = Parameter(np.array(router, dtype=np.float32))
        self.w1 = Parameter(np.array(w1, dtype=np.float32))
        self.w2 = Parameter(np.array(w2, dtype=np.float32))
        self.register_parameter("b1", None)
        self.register_parameter("b2", None)
        if shared_in is not None and shared_out is not None:
            self.shared_in = shared_in
            self.shared_out = shared_out
        self.group = group
        self.stats_group = group if stats_group is None else stats_group
        self.exchange = AllToAllExchange(group, e // group.size)
        self.first_expert = group.rank * (e // group.size)

    @classmethod
    def from_moe(
        cls, moe: Any, group: Group, stats_group: Group | None = None
    ) -> ExpertParallelMoE:
        """This rank's shard of ``moe`` (an :class:`moecore.nn.MoE`; dropless only — a
        capacity factor raises ``ValueError``). Parameters and buffers are copied, and so
        is ``aux_loss_scale``."""
        if isinstance(moe, ExpertParallelMoE):
            raise ValueError("ExpertParallelMoE.from_moe: this layer is already sharded")
        if getattr(moe, "b1", None) is not None:
            raise ValueError("ExpertParallelMoE: expert biases (bias=True) are not supported")
        if moe.capacity_factor is not None:
            raise ValueError(
                "ExpertParallelMoE: capacity dropping (capacity_factor) is not supported under "
                "expert parallelism; use dropless routing (capacity_factor None / 0)"
            )
        n = moe.n_experts // group.size
        if moe.n_experts % group.size:
            raise ValueError(f"{moe.n_experts} experts cannot be split over {group.size} ranks")
        lo = group.rank * n
        shared: dict[str, Any] = {
            name: copy.deepcopy(getattr(moe, name)) if moe.n_shared_experts else None
            for name in ("shared_in", "shared_out")
        }
        routing: dict[str, Any] = {name: getattr(moe, name) for name in _ROUTING_CONFIG}
        layer = cls(
            moe.router.data,
            moe.w1.data[lo : lo + n],
            moe.w2.data[lo : lo + n],
            group,
            stats_group=stats_group,
            expert_bias=moe.expert_bias,
            **shared,
            **routing,
        )
        layer.n_shared_experts = moe.n_shared_experts
        layer.aux_loss_scale = moe.aux_loss_scale
        layer.train(moe.training)
        return layer

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, local={self.w1.shape[0]} from {self.first_expert}, "
            f"top_k={self.top_k}, score={self.score}, activation={self.activation}, "
            f"shared={self.n_shared_experts}, ranks={self.group.size}"
        )
