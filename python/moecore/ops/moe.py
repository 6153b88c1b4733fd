"""The MoE layer as one op: route → permute → grouped expert FFN → unpermute, with the
load-balancing and z-loss gradients injected in backward (Megatron-Core's way), so a caller
never has to add the auxiliary losses to its own loss."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of
from moecore.kernels.activation import activate as _activate
from moecore.kernels.activation import activate_backward as _activate_backward
from moecore.kernels.moe import MoEKernels, moe_kernels_for

ACTIVATIONS = ("gelu", "swiglu", "relu")

_aux_loss_scale = 1.0


def set_aux_loss_scale(scale: float) -> None:
    """Scales the injected auxiliary-loss gradients as the main loss is scaled (e.g.
    ``1/accumulation_steps`` when micro-batch losses are divided by it)."""
    global _aux_loss_scale
    _aux_loss_scale = float(scale)


def _aux_terms(
    logits: Any, probs: Any, idx: Any, score: str, aux_coef: float, z_coef: float
) -> tuple[float, float, Any]:
    """Switch load-balancing loss α·E·Σ fᵢ·Pᵢ and router z-loss β·mean(logsumexp²), and the
    gradient of their sum w.r.t. the logits (fᵢ, the dispatch fractions, are constants)."""
    xp = xp_of(logits)
    t, e = probs.shape
    d_logits = xp.zeros_like(logits)
    aux = z = 0.0
    if t == 0:
        return aux, z, d_logits
    if aux_coef:
        f = xp.bincount(idx.reshape(-1), minlength=e).astype(logits.dtype) / (t * idx.shape[1])
        if score == "softmax":
            p = probs
        else:
            p = probs / probs.sum(axis=1, keepdims=True)
        aux = float(aux_coef * e * (f * p.mean(axis=0)).sum())
        c = (aux_coef * e / t) * f  # dL/dp[t, i] for every token
        add_balance_grad(d_logits, probs, p, c, score)
    if z_coef:
        z = add_z_loss(d_logits, logits, z_coef, t)
    return aux, z, d_logits


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
    ) -> Any:
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d)
        t, e = x2.shape[0], router_w.shape[0]
        kern: MoEKernels = moe_kernels_for(x2, router_w, w1, w2)
        xp = xp_of(x2)
        x2, router_w = xp.ascontiguousarray(x2), xp.ascontiguousarray(router_w)
        logits = kern.router_logits(x2, router_w)
        if not bool(xp.isfinite(logits).all()):
            # Route somewhere so the step completes; the NaN/Inf still reaches the output
            # through the token values, and the trainer skips the step on its loss.
            logits = xp.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
        normalize = k > 1
        r_bias = None if bias is None else bias.astype(logits.dtype, copy=False)
        idx, weights, probs = kern.route(logits, k, score, r_bias, n_groups, topk_groups, normalize)
        capacity = None
        if capacity_factor is not None:
            capacity = max(1, math.ceil(capacity_factor * t * k / e))
        x_sorted, order, counts = kern.permute(x2, idx, e, capacity, weights if capacity else None)
        onehot = None if b1 is None and b2 is None else _expert_onehot(counts, xp, x2.dtype)
        if activation == "gelu" and b1 is None:
            # One kernel for matmul → GELU → matmul (tiles run the whole chain per thread).
            h, a, y_sorted = kern.gelu_ffn(x_sorted, counts, w1, w2)
            act_saved = None
        else:
            h = kern.grouped_matmul(x_sorted, counts, w1)
            if b1 is not None:
                h = h + onehot.T @ b1
            a, act_saved = _activate(h, activation)
            y_sorted = kern.grouped_matmul(a, counts, w2)
        if b2 is not None:
            y_sorted = xp.ascontiguousarray(y_sorted + onehot.T @ b2)
        y = kern.unpermute(y_sorted, order, weights)
        aux, z, d_logits_aux = _aux_terms(logits, probs, idx, score, aux_loss, z_loss)
        if stats is not None:
            stats.update(
                # what the router asked for (before any capacity drop), and what was computed
                tokens_per_expert=xp.bincount(idx.reshape(-1), minlength=e).astype("int64"),
                kept_per_expert=xp.asarray(counts).astype("int64"),
                dropped=int(t * k - int(counts.sum())),
                aux_loss=aux,
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
            x_sorted,
            order,
            counts,
            h,
            act_saved,
            a,
            y_sorted,
        )
        ctx.meta = (lead, d, k, score, normalize, activation, kern)
        ctx.biases = (b1 is not None, b2 is not None, onehot)
        ctx.d_logits_aux = d_logits_aux
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
            x_sorted,
            order,
            counts,
            h,
            act_saved,
            a,
            y_sorted,
        ) = ctx.saved_tensors
        lead, d, k, score, normalize, activation = ctx.meta[:6]
        kern: MoEKernels = ctx.meta[6]
        t = x2.shape[0]
        g2 = g.reshape(t, -1)
        if not g2.flags.c_contiguous:
            g2 = g2.copy()
        d_y_sorted, d_weights = kern.unpermute_backward(g2, y_sorted, order, weights)
        has_b1, has_b2, onehot = ctx.biases
        d_h = None
        if activation == "gelu" and not has_b1:
            d_x_sorted, d_w1, d_w2 = kern.gelu_ffn_backward(
                x_sorted, counts, w1, w2, h, a, d_y_sorted
            )
        else:
            d_a = kern.grouped_matmul_dx(d_y_sorted, counts, w2)
            d_w2 = kern.grouped_matmul_dw(a, d_y_sorted, counts)
            d_h = _activate_backward(d_a, h, act_saved, activation)
            d_x_sorted = kern.grouped_matmul_dx(d_h, counts, w1)
            d_w1 = kern.grouped_matmul_dw(x_sorted, d_h, counts)
        d_x = kern.permute_backward(d_x_sorted, order, t, k)
        d_logits = kern.route_backward(d_weights, idx, probs, score, normalize)
        d_logits += (ctx.d_logits_aux * _aux_loss_scale).astype(d_logits.dtype, copy=False)
        d_router = kern.router_backward(d_logits, x2, router_w, d_x)  # also d_x += d_logits·R
        # A reshape to the same shape would be a view, which autograd copies before
        # handing it to a leaf's .grad: return the array itself when no reshape is needed.
        d_b1 = onehot @ d_h if has_b1 else None
        d_b2 = onehot @ d_y_sorted if has_b2 else None
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
) -> Tensor:
    """A routed-experts layer on ``x [..., d]``: router ``[E, d]``, experts ``w1 [E, d, h]``
    (``[E, d, 2h]`` for SwiGLU) and ``w2 [E, h, d_out]``, with optional expert biases
    ``b1 [E, h]`` (``[E, 2h]``) and ``b2 [E, d_out]`` (a GELU layer with ``b1`` leaves the
    fused expert kernel for the unfused path). Dropless unless
    ``capacity_factor`` is given; weights renormalised over the ``k`` chosen experts when
    ``k > 1``. ``aux_loss``/``z_loss`` coefficients add their gradients in backward; their
    values and the routing counts go to ``stats`` when a dict is given."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
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
    )
