"""Expert parallelism: the experts of an MoE layer spread over the ranks of a group.

Every rank routes its own tokens with the (replicated) router, then *dispatches* each token
row to the rank holding its expert with an all-to-all-v (the per-expert counts go first, so
every rank knows what it receives), runs its local experts, and *combines* the results back
with the reverse all-to-all-v. In backward the roles swap: the output gradient is
dispatched, the input gradient combined. The router's gradient is per rank (each rank's own
tokens): average or sum it over the group like any replicated parameter (e.g. with
:class:`~moecore.dist.DataParallel`); the local experts' gradients are complete as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.dist.group import Group
from moecore.kernels import moe_kernels_for
from moecore.nn.module import Module
from moecore.nn.parameter import Parameter
from moecore.ops.moe import _activate, _activate_backward

__all__ = ["ExpertParallelMoE"]


class _Exchange:
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


class _EPMoE(Function):
    @staticmethod
    def forward(
        ctx: Context,
        x: Any,
        router_w: Any,
        w1: Any,
        w2: Any,
        *,
        group: Group,
        k: int,
        score: str,
        activation: str,
        stats: dict[str, Any],
    ) -> Any:
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = np.ascontiguousarray(x.reshape(-1, d))
        t, e = x2.shape[0], router_w.shape[0]
        kern = moe_kernels_for(x2, router_w, w1, w2)
        normalize = k > 1
        logits = x2 @ router_w.T
        idx, weights, probs = kern.route(logits, k, score, None, None, None, normalize)
        x_sorted, order, counts = kern.permute(x2, idx, e, None, None)
        plan = _Exchange(group, np.asarray(counts), w1.shape[0])
        x_local = plan.dispatch(x_sorted)
        h = kern.grouped_matmul(x_local, plan.local_counts, w1)
        a, act_saved = _activate(h, activation)
        y_local = kern.grouped_matmul(a, plan.local_counts, w2)
        y_sorted = plan.combine(y_local)
        y = kern.unpermute(y_sorted, order, weights)
        stats.update(tokens_per_expert=np.asarray(counts).astype(np.int64), tokens=t)
        ctx.save_for_backward(x2, router_w, w1, w2, idx, weights, probs, order, x_local, h, a)
        ctx.meta = (lead, d, k, score, normalize, activation, kern, plan, act_saved, y_sorted)
        return y.reshape(*lead, w2.shape[2])

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        x2, router_w, w1, w2, idx, weights, probs, order, x_local, h, a = ctx.saved_tensors
        lead, d, k, score, normalize, activation, kern, plan, act_saved, y_sorted = ctx.meta
        t = x2.shape[0]
        g2 = np.ascontiguousarray(g.reshape(t, -1))
        d_y_sorted, d_weights = kern.unpermute_backward(g2, y_sorted, order, weights)
        d_y_local = plan.dispatch(d_y_sorted)  # backward of combine
        lc = plan.local_counts
        d_a = kern.grouped_matmul_dx(d_y_local, lc, w2)
        d_w2 = kern.grouped_matmul_dw(a, d_y_local, lc)
        d_h = _activate_backward(d_a, h, act_saved, activation)
        d_x_local = kern.grouped_matmul_dx(d_h, lc, w1)
        d_w1 = kern.grouped_matmul_dw(x_local, d_h, lc)
        d_x_sorted = plan.combine(d_x_local)  # backward of dispatch
        d_x = kern.permute_backward(d_x_sorted, order, t, k)
        d_logits = kern.route_backward(d_weights, idx, probs, score, normalize)
        d_x += d_logits @ router_w
        d_router = d_logits.T @ x2
        return d_x.reshape(*lead, d), d_router, d_w1, d_w2


class ExpertParallelMoE(Module):
    """The routed experts of an MoE layer, ``n_experts / group.size`` per rank.

    Build it from a full :class:`moecore.nn.MoE` (identical on every rank, e.g. same seed)
    with :meth:`from_moe`: rank r keeps experts ``[r·E/P, (r+1)·E/P)`` (global expert ids
    are kept in the parameter names' meaning: ``w1[j]`` is expert ``r·E/P + j``). Dropless
    routing without auxiliary losses, shared experts or bias balancing (not yet).

    Args:
        router: ``[E, d]`` replicated router weights.
        w1: ``[E/P, d, h]`` local experts' first matrices; w2: ``[E/P, h, d]``.
        group: the expert-parallel group.
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
    ) -> None:
        super().__init__()
        e = router.shape[0]
        if e % group.size:
            raise ValueError(f"{e} experts cannot be split over {group.size} ranks")
        if w1.shape[0] != e // group.size or w2.shape[0] != e // group.size:
            raise ValueError(
                f"each rank holds {e // group.size} experts; got w1 {w1.shape}, w2 {w2.shape}"
            )
        self.group = group
        self.top_k, self.score, self.activation = top_k, score, activation
        self.router = Parameter(np.array(router, dtype=np.float32))
        self.w1 = Parameter(np.array(w1, dtype=np.float32))
        self.w2 = Parameter(np.array(w2, dtype=np.float32))
        self.first_expert = group.rank * (e // group.size)
        self.last_stats: dict[str, Any] = {}

    @classmethod
    def from_moe(cls, moe: Any, group: Group) -> ExpertParallelMoE:
        """This rank's shard of ``moe`` (an :class:`moecore.nn.MoE` without shared experts,
        capacity, auxiliary losses or bias balancing)."""
        if moe.n_shared_experts or moe.capacity_factor is not None or moe.bias_update_rate:
            raise ValueError(
                "ExpertParallelMoE supports dropless routed experts only (no shared experts, "
                "capacity factor or bias balancing yet)"
            )
        n = moe.n_experts // group.size
        lo = group.rank * n
        return cls(
            moe.router.data,
            moe.w1.data[lo : lo + n],
            moe.w2.data[lo : lo + n],
            group,
            top_k=moe.top_k,
            score=moe.score,
            activation=moe.activation,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Routes ``x [..., d]`` over every rank's experts and combines the outputs."""
        stats: dict[str, Any] = {}
        y = _EPMoE.apply(
            x,
            self.router,
            self.w1,
            self.w2,
            group=self.group,
            k=self.top_k,
            score=self.score,
            activation=self.activation,
            stats=stats,
        )
        self.last_stats = stats
        return y
