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
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.distributed.group import Group
from moecore.kernels import moe_kernels_for
from moecore.nn.module import Module
from moecore.nn.moe import routing_summary, shared_experts
from moecore.nn.parameter import Parameter
from moecore.ops.moe import _activate, _activate_backward, add_balance_grad, add_z_loss

__all__ = ["ExpertParallelMoE"]

# The op module (not the ``moe`` function ``moecore.ops`` re-exports under the same name):
# its ``_aux_loss_scale`` is read at backward time, as the single-process op does.
_moe_op = importlib.import_module("moecore.ops.moe")


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


def _group_aux_terms(
    logits: np.ndarray,
    probs: np.ndarray,
    idx: np.ndarray,
    score: str,
    aux_coef: float,
    z_coef: float,
    stats_group: Group,
) -> tuple[float, float, np.ndarray]:
    """The Switch loss α·E·Σ fᵢ·Pᵢ over the tokens of every rank of ``stats_group`` and the
    router z-loss, with their gradient w.r.t. this rank's logits scaled for averaging over
    the group (a rank's share is ``size`` × its tokens' part of the global gradient)."""
    t, e = probs.shape
    d_logits = np.zeros_like(logits)
    aux = z = 0.0
    if aux_coef:
        p = probs if score == "softmax" else probs / probs.sum(axis=1, keepdims=True)
        # Token counts per expert, summed probabilities per expert, tokens: one all-reduce.
        buf = np.concatenate(
            [
                np.bincount(idx.reshape(-1), minlength=e).astype(np.float64),
                p.sum(axis=0, dtype=np.float64),
                [float(t)],
            ]
        )
        stats_group.allreduce(buf)
        total = buf[-1]
        if total > 0:
            f = buf[:e] / (total * idx.shape[1])
            aux = float(aux_coef * e * (f * buf[e : 2 * e] / total).sum())
            # Single process: dL/dp[t, i] = α·E·fᵢ / T; averaging over the group divides by
            # its size, so each rank applies size × that to its own tokens.
            c = (aux_coef * e * stats_group.size / total * f).astype(logits.dtype)
            if t:
                add_balance_grad(d_logits, probs, p, c, score)
    if z_coef and t:
        # A per-token mean: this rank's mean, averaged over equal shares, is the global one.
        z = add_z_loss(d_logits, logits, z_coef, t)
    return aux, z, d_logits


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
        stats_group: Group,
        k: int,
        score: str,
        bias: Any,
        n_groups: int | None,
        topk_groups: int | None,
        activation: str,
        aux_loss: float,
        z_loss: float,
        stats: dict[str, Any],
    ) -> Any:
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = np.ascontiguousarray(x.reshape(-1, d))
        t, e = x2.shape[0], router_w.shape[0]
        kern = moe_kernels_for(x2, router_w, w1, w2)
        normalize = k > 1
        router_w = np.ascontiguousarray(router_w)
        # The single-process op's router kernels, so both layouts round alike.
        logits = kern.router_logits(x2, router_w)
        if not bool(np.isfinite(logits).all()):
            # As the single-process op: route somewhere so every rank completes the step.
            logits = np.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
        r_bias = None if bias is None else bias.astype(logits.dtype, copy=False)
        idx, weights, probs = kern.route(logits, k, score, r_bias, n_groups, topk_groups, normalize)
        x_sorted, order, counts = kern.permute(x2, idx, e, None, None)
        plan = _Exchange(group, np.asarray(counts), w1.shape[0])
        x_local = plan.dispatch(x_sorted)
        h = kern.grouped_matmul(x_local, plan.local_counts, w1)
        a, act_saved = _activate(h, activation)
        y_local = kern.grouped_matmul(a, plan.local_counts, w2)
        y_sorted = plan.combine(y_local)
        y = kern.unpermute(y_sorted, order, weights)
        aux, z, d_logits_aux = _group_aux_terms(
            logits, probs, idx, score, aux_loss, z_loss, stats_group
        )
        tokens_per_expert = np.asarray(counts).astype(np.int64)
        stats.update(
            tokens_per_expert=tokens_per_expert,
            kept_per_expert=tokens_per_expert,
            dropped=0,
            aux_loss=aux,
            z_loss=z,
            router_entropy=_moe_op.router_entropy(probs),
            tokens=t,
        )
        ctx.save_for_backward(x2, router_w, w1, w2, idx, weights, probs, order, x_local, h, a)
        ctx.meta = (lead, d, k, score, normalize, activation, kern, plan, act_saved, y_sorted)
        ctx.d_logits_aux = d_logits_aux if (aux_loss or z_loss) else None
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
        if ctx.d_logits_aux is not None:
            scale = _moe_op._aux_loss_scale
            d_logits += (ctx.d_logits_aux * scale).astype(d_logits.dtype, copy=False)
        d_router = kern.router_backward(d_logits, x2, router_w, d_x)  # also d_x += d_logits·R
        return d_x.reshape(*lead, d), d_router, d_w1, d_w2


class ExpertParallelMoE(Module):
    """An MoE layer whose routed experts are spread over ``group``: ``n_experts / size`` per
    rank, rank r holding global experts ``[r·E/P, (r+1)·E/P)`` (``w1[j]`` is expert
    ``r·E/P + j``). Router, router bias and shared experts are replicated.

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
    ) -> None:
        super().__init__()
        e = router.shape[0]
        if e % group.size:
            raise ValueError(f"{e} experts cannot be split over {group.size} ranks")
        if w1.shape[0] != e // group.size or w2.shape[0] != e // group.size:
            raise ValueError(
                f"each rank holds {e // group.size} experts; got w1 {w1.shape}, w2 {w2.shape}"
            )
        if (shared_in is None) != (shared_out is None):
            raise ValueError("shared_in and shared_out go together")
        self.group = group
        self.stats_group = group if stats_group is None else stats_group
        self.n_experts, self.top_k, self.score, self.activation = e, top_k, score, activation
        self.aux_loss, self.z_loss, self.bias_update_rate = aux_loss, z_loss, bias_update_rate
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.router = Parameter(np.array(router, dtype=np.float32))
        self.w1 = Parameter(np.array(w1, dtype=np.float32))
        self.w2 = Parameter(np.array(w2, dtype=np.float32))
        self.n_shared_experts = 0
        if shared_in is not None:
            self.shared_in = shared_in
            self.shared_out = shared_out
            self.n_shared_experts = 1
        bias = np.zeros(e, np.float32) if expert_bias is None else expert_bias
        self.register_buffer("expert_bias", np.array(bias, dtype=np.float32))
        self.first_expert = group.rank * (e // group.size)
        self.last_stats: dict[str, Any] = {}
        self._load_since_update = np.zeros(e, np.int64)

    @classmethod
    def from_moe(
        cls, moe: Any, group: Group, stats_group: Group | None = None
    ) -> ExpertParallelMoE:
        """This rank's shard of ``moe`` (an :class:`moecore.nn.MoE`; dropless only — a
        capacity factor raises ``ValueError``). Parameters and buffers are copied."""
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
        layer = cls(
            moe.router.data,
            moe.w1.data[lo : lo + n],
            moe.w2.data[lo : lo + n],
            group,
            top_k=moe.top_k,
            score=moe.score,
            activation=moe.activation,
            stats_group=stats_group,
            aux_loss=moe.aux_loss,
            z_loss=moe.z_loss,
            bias_update_rate=moe.bias_update_rate,
            expert_bias=moe.expert_bias,
            n_groups=moe.n_groups,
            topk_groups=moe.topk_groups,
            shared_in=copy.deepcopy(moe.shared_in) if moe.n_shared_experts else None,
            shared_out=copy.deepcopy(moe.shared_out) if moe.n_shared_experts else None,
        )
        layer.n_shared_experts = moe.n_shared_experts
        layer.train(moe.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """Routes ``x [..., d]`` over every rank's experts and combines the outputs."""
        if x.shape[-1] != self.router.shape[1]:
            raise ValueError(
                f"ExpertParallelMoE expects [..., {self.router.shape[1]}], got {x.shape}"
            )
        stats: dict[str, Any] = {}
        y = _EPMoE.apply(
            x,
            self.router,
            self.w1,
            self.w2,
            group=self.group,
            stats_group=self.stats_group,
            k=self.top_k,
            score=self.score,
            bias=self.expert_bias if self.bias_update_rate else None,
            n_groups=self.n_groups,
            topk_groups=self.topk_groups,
            activation=self.activation,
            aux_loss=self.aux_loss if self.training else 0.0,
            z_loss=self.z_loss if self.training else 0.0,
            stats=stats,
        )
        if self.n_shared_experts:
            y = y + shared_experts(self, x)
        stats.update(routing_summary(stats["tokens_per_expert"]))
        self.last_stats = stats
        if self.training:
            self._load_since_update += stats["tokens_per_expert"]
        return y

    def update_bias(self, load: Any = None) -> None:
        """DeepSeek-V3 aux-loss-free balancing, as :meth:`moecore.nn.MoE.update_bias`: pass
        (or first all-reduce into ``_load_since_update``) the load of every rank so that all
        ranks move the replicated bias alike."""
        if not self.bias_update_rate:
            return
        c = np.asarray(self._load_since_update if load is None else load, dtype=np.float64)
        step = self.bias_update_rate * np.sign(c.mean() - c)
        self.expert_bias += step.astype(self.expert_bias.dtype)
        self._load_since_update[...] = 0

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, local={self.w1.shape[0]} from {self.first_expert}, "
            f"top_k={self.top_k}, score={self.score}, activation={self.activation}, "
            f"shared={self.n_shared_experts}, ranks={self.group.size}"
        )
