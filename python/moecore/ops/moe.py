"""The MoE layer as one op: route → permute → grouped expert FFN → unpermute, with the
load-balancing and z-loss gradients injected in backward (Megatron-Core's way), so a caller
never has to add the auxiliary losses to its own loss.

Two optional hooks make the same op the expert-parallel layer (experts spread over ranks):

- an **exchange** (:class:`ExpertExchange`) moves the expert-sorted token rows to the ranks
  holding their experts before the expert FFN (*dispatch*) and the results back after it
  (*combine*); in backward the roles swap: the output gradient is dispatched, the input
  gradient combined;
- a **statistics group** (:class:`StatsGroup`) sums the Switch loss's routing counts, router
  probabilities and token count over its ranks (one all-reduce of 2·E+1 numbers per layer
  and step), so the loss value and gradient equal those of one process holding every token.

Without them (the default) nothing else changes: the single-process path runs as it is.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import to_device, xp_of
from moecore.kernels.activation import activate as _activate
from moecore.kernels.activation import activate_backward as _activate_backward
from moecore.kernels.moe import MoEKernels, moe_kernels_for

ACTIVATIONS = ("gelu", "swiglu", "relu")


class ExchangePlan(Protocol):
    """Where one routing's expert-sorted rows go: made by :meth:`ExpertExchange.plan`, used
    by the op's forward and (with the roles swapped) its backward."""

    #: Rows per local expert after :meth:`dispatch` (what the local expert FFN runs on).
    local_counts: Any

    def dispatch(self, rows: Any) -> Any:
        """This process's expert-sorted rows → the rows of its local experts (expert-major)."""
        ...

    def combine(self, rows: Any) -> Any:
        """The local experts' rows → this process's expert-sorted rows (the adjoint of
        :meth:`dispatch`, a permutation of rows between processes)."""
        ...


class ExpertExchange(Protocol):
    """Moves token rows between the processes that share a layer's experts (e.g. the
    all-to-all-v of :class:`moecore.distributed.ExpertParallelMoE`)."""

    def plan(self, counts: Any) -> ExchangePlan:
        """The plan for this process's rows per global expert ``counts`` (length E); a
        collective: every process of the exchange calls it once per forward."""
        ...


class StatsGroup(Protocol):
    """Processes whose tokens make up one batch (a :class:`moecore.distributed.Group`
    satisfies it): the Switch loss sums its statistics over them."""

    size: int

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        """In place: ``buf`` becomes the sum of every process's ``buf``."""
        ...


def _aux_terms(
    logits: Any,
    probs: Any,
    idx: Any,
    score: str,
    aux_coef: float,
    z_coef: float,
    stats_group: StatsGroup | None = None,
) -> tuple[float, float, Any]:
    """Switch load-balancing loss α·E·Σ fᵢ·Pᵢ and router z-loss β·mean(logsumexp²), and the
    gradient of their sum w.r.t. the logits (fᵢ, the dispatch fractions, are constants).

    With ``stats_group``, fᵢ and Pᵢ are those of every process's tokens, and the gradient
    is this process's share for averaging over the group (``size`` × its tokens' part of
    the whole batch's gradient). The z-loss is a per-token mean: each process's own mean,
    averaged over equal shares, is the whole batch's."""
    xp = xp_of(logits)
    t = probs.shape[0]
    d_logits = xp.zeros_like(logits)
    aux = z = 0.0
    if aux_coef:
        aux = _add_switch_loss(d_logits, probs, idx, score, aux_coef, stats_group)
    if z_coef and t:
        z = add_z_loss(d_logits, logits, z_coef, t)
    return aux, z, d_logits


def _add_switch_loss(
    d_logits: Any,
    probs: Any,
    idx: Any,
    score: str,
    aux_coef: float,
    stats_group: StatsGroup | None,
) -> float:
    """The Switch loss over this process's tokens (or ``stats_group``'s); adds its
    gradient w.r.t. this process's logits to ``d_logits``."""
    xp = xp_of(probs)
    t, e = probs.shape
    p = probs if score == "softmax" else probs / probs.sum(axis=1, keepdims=True)
    counts, p_sum, tokens, shares = xp.bincount(idx.reshape(-1), minlength=e), None, t, 1
    if stats_group is not None:
        # Token counts per expert, summed probabilities per expert, tokens: one all-reduce
        # (collective, so it runs even on a process without tokens).
        host = [to_device(a, "cpu") for a in (counts, p.sum(axis=0, dtype=np.float64))]
        buf = np.concatenate([host[0].astype(np.float64), host[1], [float(t)]])
        stats_group.allreduce(buf)
        counts, p_sum = xp.asarray(buf[:e]), xp.asarray(buf[e : 2 * e])
        tokens, shares = buf[-1], stats_group.size
    if tokens == 0:
        return 0.0
    f = counts.astype(d_logits.dtype) / (tokens * idx.shape[1])
    mean_p = p.mean(axis=0) if p_sum is None else p_sum / tokens
    aux = float(aux_coef * e * (f * mean_p).sum())
    if t:
        # dL/dp[t, i] = α·E·fᵢ / T for every token (× shares when averaged over a group).
        c = ((aux_coef * e * shares / tokens) * f).astype(d_logits.dtype, copy=False)
        add_balance_grad(d_logits, probs, p, c, score)
    return aux


def add_sequence_balance_loss(
    d_logits: Any, probs: Any, idx: Any, score: str, alpha: float, seq_len: int
) -> float:
    """DeepSeek-V3's complementary sequence-wise balance loss (V3-TR eqs. 17-20), the mean
    over sequences of α·Σᵢ fᵢ·Pᵢ with, per sequence of ``seq_len`` tokens,
    fᵢ = E/(k·T)·(tokens choosing expert i), Pᵢ = mean over tokens of the normalised scores
    sᵢ/Σⱼsⱼ; adds its gradient w.r.t. the logits to ``d_logits`` (the fᵢ are constants).

    Each process's tokens are whole sequences, so no statistics cross processes: the mean
    over this process's sequences, averaged over equal shares, is the batch's mean."""
    xp = xp_of(probs)
    t, e = probs.shape
    if t == 0:
        return 0.0
    n_seq, k = t // seq_len, idx.shape[1]
    p = probs if score == "softmax" else probs / probs.sum(axis=1, keepdims=True)
    seq_of = xp.repeat(xp.arange(n_seq), seq_len * k)
    flat = seq_of * e + idx.reshape(-1).astype(xp.int64)
    counts = xp.bincount(flat, minlength=n_seq * e).reshape(n_seq, e)
    f = counts.astype(d_logits.dtype) * (e / (k * seq_len))
    mean_p = p.reshape(n_seq, seq_len, e).mean(axis=1)
    loss = float(alpha * (f * mean_p).sum() / n_seq)
    # dL/dp[t, i] = α·fᵢ(seq of t) / (T · n_seq)
    c = xp.repeat(f * (alpha / (seq_len * n_seq)), seq_len, axis=0).astype(d_logits.dtype)
    add_balance_grad(d_logits, probs, p, c, score)
    return loss


def add_balance_grad(d_logits: Any, probs: Any, p: Any, c: Any, score: str) -> None:
    """Adds to ``d_logits`` the gradient of Σ_t Σ_i cᵢ·p[t, i] through the router scores
    (``p`` is ``probs`` for softmax, the normalised sigmoid scores otherwise)."""
    if score == "softmax":
        d_logits += p * (c - (p * c).sum(axis=1, keepdims=True))
    else:
        s_sum = probs.sum(axis=1, keepdims=True)
        d_s = (c - (c * p).sum(axis=1, keepdims=True)) / s_sum
        d_logits += d_s * probs * (1 - probs)


def add_z_loss(d_logits: Any, logits: Any, z_coef: float, t: int) -> float:
    """The router z-loss β·Σ logsumexp²/t over these logits (``t`` the tokens it is averaged
    over); adds its gradient to ``d_logits``."""
    xp = xp_of(logits)
    m = logits.max(axis=1, keepdims=True)
    ex = xp.exp(logits - m)
    total = ex.sum(axis=1, keepdims=True)
    lse = m + xp.log(total)
    d_logits += (2 * z_coef / t) * lse * (ex / total)
    return float(z_coef * (lse * lse).sum() / t)


def _expert_onehot(counts: Any, xp: Any, dtype: Any) -> Any:
    """``[E, rows]`` indicator of which expert each expert-sorted row belongs to."""
    host = counts.get() if hasattr(counts, "get") else np.asarray(counts)
    seg = xp.asarray(np.repeat(np.arange(len(host)), host.astype(np.int64)))
    return (seg[None, :] == xp.arange(len(host))[:, None]).astype(dtype)


def router_entropy(probs: Any) -> float:
    """Mean over tokens of the entropy (nats) of each token's routing distribution (the
    scores renormalised to sum to 1): ln E when the router is undecided, 0 when it is sure."""
    xp = xp_of(probs)
    if probs.shape[0] == 0:
        return 0.0
    p = probs / xp.maximum(probs.sum(axis=1, keepdims=True), 1e-30)
    return float(-(p * xp.log(xp.maximum(p, 1e-30))).sum(axis=1).mean())


class MoEFunction(Function):
    @staticmethod
    def forward(
        ctx: Context,
        x: Any,
        router_w: Any,
        w1: Any,
        w2: Any,
        b1: Any,
        b2: Any,
        *,
        k: int,
        score: str,
        bias: Any,
        n_groups: int | None,
        topk_groups: int | None,
        capacity_factor: float | None,
        activation: str,
        aux_loss: float,
        z_loss: float,
        stats: dict[str, Any] | None,
        aux_loss_scale: float = 1.0,
        exchange: ExpertExchange | None = None,
        stats_group: StatsGroup | None = None,
        seq_aux_loss: float = 0.0,
    ) -> Any:
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d)
        t, e = x2.shape[0], router_w.shape[0]
        kern: MoEKernels = moe_kernels_for(x2, router_w, w1, w2)
        xp = xp_of(x2)
        x2, router_w = xp.ascontiguousarray(x2), xp.ascontiguousarray(router_w)
        logits = kern.router_logits(x2, router_w)
        if not bool(xp.isfinite(logits).all()):
            # Route somewhere so the step completes (on every process of an exchange); the
            # NaN/Inf still reaches the output through the token values, and the trainer
            # skips the step on its loss.
            logits = xp.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
        normalize = k > 1
        r_bias = None if bias is None else bias.astype(logits.dtype, copy=False)
        idx, weights, probs = kern.route(logits, k, score, r_bias, n_groups, topk_groups, normalize)
        capacity = None
        if capacity_factor is not None:
            capacity = max(1, math.ceil(capacity_factor * t * k / e))
        x_sorted, order, counts = kern.permute(x2, idx, e, capacity, weights if capacity else None)
        # The expert FFN runs on the rows of the experts held here: this process's own
        # (x_sorted, counts) or, with an exchange, the rows every process sent them.
        plan = None if exchange is None else exchange.plan(counts)
        x_exp = x_sorted if plan is None else plan.dispatch(x_sorted)
        n_exp = counts if plan is None else plan.local_counts
        onehot = None if b1 is None and b2 is None else _expert_onehot(n_exp, xp, x2.dtype)
        if activation == "gelu" and b1 is None:
            # One kernel for matmul → GELU → matmul (tiles run the whole chain per thread).
            h, a, y_exp = kern.gelu_ffn(x_exp, n_exp, w1, w2)
            act_saved = None
        else:
            h = kern.grouped_matmul(x_exp, n_exp, w1)
            if b1 is not None:
                assert onehot is not None  # made above whenever a bias is given
                h = h + onehot.T @ b1
            a, act_saved = _activate(h, activation)
            y_exp = kern.grouped_matmul(a, n_exp, w2)
        if b2 is not None:
            assert onehot is not None
            y_exp = xp.ascontiguousarray(y_exp + onehot.T @ b2)
        y_sorted = y_exp if plan is None else plan.combine(y_exp)
        y = kern.unpermute(y_sorted, order, weights)
        aux, z, d_logits_aux = _aux_terms(logits, probs, idx, score, aux_loss, z_loss, stats_group)
        seq_aux = 0.0
        if seq_aux_loss:
            # x [batch, T, d]: sequences of T tokens; any other shape is one sequence.
            seq_len = lead[-1] if len(lead) >= 2 and lead[-1] else t
            seq_aux = add_sequence_balance_loss(
                d_logits_aux, probs, idx, score, seq_aux_loss, seq_len
            )
        if stats is not None:
            stats.update(
                # what the router asked for (before any capacity drop), and what was computed
                tokens_per_expert=xp.bincount(idx.reshape(-1), minlength=e).astype("int64"),
                kept_per_expert=xp.asarray(counts).astype("int64"),
                dropped=int(t * k - int(counts.sum())),
                aux_loss=aux,
                seq_aux_loss=seq_aux,
                z_loss=z,
                router_entropy=router_entropy(probs),
                tokens=t,
            )
        ctx.save_for_backward(
            x2,
            router_w,
            w1,
            w2,
            idx,
            weights,
            probs,
            x_exp,
            order,
            n_exp,
            h,
            act_saved,
            a,
            y_sorted,
        )
        ctx.meta = (lead, d, k, score, normalize, activation, kern, plan)
        ctx.biases = (b1 is not None, b2 is not None, onehot)
        # The injected gradient follows the caller's loss scaling (e.g. 1/accumulation).
        ctx.d_logits_aux = d_logits_aux * aux_loss_scale if aux_loss_scale != 1 else d_logits_aux
        return y.reshape(*lead, w2.shape[2])

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (
            x2,
            router_w,
            w1,
            w2,
            idx,
            weights,
            probs,
            x_exp,
            order,
            n_exp,
            h,
            act_saved,
            a,
            y_sorted,
        ) = ctx.saved_tensors
        lead, d, k, score, normalize, activation = ctx.meta[:6]
        kern: MoEKernels = ctx.meta[6]
        plan = ctx.meta[7]
        t = x2.shape[0]
        g2 = g.reshape(t, -1)
        if not g2.flags.c_contiguous:
            g2 = g2.copy()
        d_y_sorted, d_weights = kern.unpermute_backward(g2, y_sorted, order, weights)
        # Backward of combine: the output gradient goes where the rows were computed.
        d_y_exp = d_y_sorted if plan is None else plan.dispatch(d_y_sorted)
        has_b1, has_b2, onehot = ctx.biases
        d_h = None
        if activation == "gelu" and not has_b1:
            d_x_exp, d_w1, d_w2 = kern.gelu_ffn_backward(x_exp, n_exp, w1, w2, h, a, d_y_exp)
        else:
            d_a = kern.grouped_matmul_dx(d_y_exp, n_exp, w2)
            d_w2 = kern.grouped_matmul_dw(a, d_y_exp, n_exp)
            d_h = _activate_backward(d_a, h, act_saved, activation)
            d_x_exp = kern.grouped_matmul_dx(d_h, n_exp, w1)
            d_w1 = kern.grouped_matmul_dw(x_exp, d_h, n_exp)
        # Backward of dispatch: the input gradient goes back to the rows' own process.
        d_x_sorted = d_x_exp if plan is None else plan.combine(d_x_exp)
        d_x = kern.permute_backward(d_x_sorted, order, t, k)
        d_logits = kern.route_backward(d_weights, idx, probs, score, normalize)
        d_logits += ctx.d_logits_aux.astype(d_logits.dtype, copy=False)
        d_router = kern.router_backward(d_logits, x2, router_w, d_x)  # also d_x += d_logits·R
        # A reshape to the same shape would be a view, which autograd copies before
        # handing it to a leaf's .grad: return the array itself when no reshape is needed.
        d_b1 = onehot @ d_h if has_b1 else None
        d_b2 = onehot @ d_y_exp if has_b2 else None
        d_x = d_x if lead == (t,) else d_x.reshape(*lead, d)
        return d_x, d_router, d_w1, d_w2, d_b1, d_b2


def moe(
    x: Tensor,
    router_w: Tensor,
    w1: Tensor,
    w2: Tensor,
    k: int = 2,
    score: str = "softmax",
    bias: Any = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
    capacity_factor: float | None = None,
    activation: str = "gelu",
    aux_loss: float = 0.0,
    z_loss: float = 0.0,
    stats: dict[str, Any] | None = None,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    aux_loss_scale: float = 1.0,
    exchange: ExpertExchange | None = None,
    stats_group: StatsGroup | None = None,
    seq_aux_loss: float = 0.0,
) -> Tensor:
    """A routed-experts layer on ``x [..., d]``: router ``[E, d]``, experts ``w1 [E, d, h]``
    (``[E, d, 2h]`` for SwiGLU) and ``w2 [E, h, d_out]``, with optional expert biases
    ``b1 [E, h]`` (``[E, 2h]``) and ``b2 [E, d_out]`` (a GELU layer with ``b1`` leaves the
    fused expert kernel for the unfused path). Dropless unless
    ``capacity_factor`` is given; weights renormalised over the ``k`` chosen experts when
    ``k > 1``. ``aux_loss``/``z_loss`` coefficients add their gradients in backward; their
    values and the routing counts go to ``stats`` when a dict is given.

    ``aux_loss_scale`` multiplies those injected gradients as the caller multiplies its loss
    (``1/n`` when ``n`` accumulated micro-batch losses are each divided by ``n``).

    Expert parallelism: with ``exchange``, ``w1``/``w2`` (and ``b1``/``b2``) hold only the
    experts of this process and the exchange moves rows to and from the others; with
    ``stats_group``, the Switch loss uses the routing statistics of all its processes (see
    the module docstring). Capacity dropping needs every token in one process, so it does
    not combine with an exchange."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if exchange is not None and capacity_factor is not None:
        raise ValueError(
            "moe: capacity_factor with an exchange (expert parallelism) is not supported: "
            "the per-expert capacity would need a ranking of every process's assignments"
        )
    return MoEFunction.apply(
        x,
        router_w,
        w1,
        w2,
        b1,
        b2,
        k=k,
        score=score,
        bias=bias,
        n_groups=n_groups,
        topk_groups=topk_groups,
        capacity_factor=capacity_factor,
        activation=activation,
        aux_loss=aux_loss,
        z_loss=z_loss,
        stats=stats,
        aux_loss_scale=aux_loss_scale,
        exchange=exchange,
        stats_group=stats_group,
        seq_aux_loss=seq_aux_loss,
    )
