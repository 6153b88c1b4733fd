"""The MoE kernels written with array-module operations (numpy or CuPy, any float dtype): the
array-module implementation of :class:`moecore.kernels.moe.MoEKernels`.

Same names, arguments and semantics as :mod:`moecore.moe_kernels` (see its docstrings);
slower, but dtype-generic: float64 gradient checks and CuPy arrays without a dedicated GPU
kernel run through here. Inputs are assumed valid (the Rust path validates).
"""

from __future__ import annotations

from typing import Any

from moecore.backend import xp_of
from moecore.kernels.activation import gelu_backward, gelu_forward


def _scores(logits: Any, score: str) -> Any:
    xp = xp_of(logits)
    if score == "softmax":
        e = xp.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return (0.5 * (1 + xp.tanh(0.5 * logits))).astype(logits.dtype, copy=False)


def route(
    logits: Any,
    k: int,
    score: str = "softmax",
    bias: Any = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
    normalize: bool = True,
) -> tuple[Any, Any, Any]:
    """See :func:`moecore.moe_kernels.route`."""
    xp = xp_of(logits)
    t, e = logits.shape
    probs = _scores(logits, score)
    choice = probs + bias if bias is not None else probs.copy()
    if n_groups is not None and topk_groups is not None:
        per = e // n_groups
        grouped = choice.reshape(t, n_groups, per)
        top = -xp.sort(-grouped, axis=2)[:, :, : min(2, per)]
        group_score = top.sum(axis=2)
        ranked = xp.argsort(-group_score, axis=1, kind="stable")[:, :topk_groups]
        allowed = xp.zeros((t, n_groups), dtype=bool)
        xp.put_along_axis(allowed, ranked, True, axis=1)
        choice = xp.where(xp.repeat(allowed, per, axis=1), choice, -xp.inf)
    idx = xp.argsort(-choice, axis=1, kind="stable")[:, :k].astype(xp.int32)
    weights = xp.take_along_axis(probs, idx, axis=1)
    if normalize:
        total = weights.sum(axis=1, keepdims=True)
        weights = xp.where(total > 0, weights / xp.where(total > 0, total, 1), 0).astype(
            probs.dtype
        )
    return idx, weights, probs


def route_backward(
    d_weights: Any, expert_idx: Any, probs: Any, score: str = "softmax", normalize: bool = True
) -> Any:
    """See :func:`moecore.moe_kernels.route_backward`."""
    xp = xp_of(probs)
    raw = xp.take_along_axis(probs, expert_idx, axis=1)
    d_raw = d_weights
    if normalize:
        total = raw.sum(axis=1, keepdims=True)
        safe = xp.where(total > 0, total, 1)
        w = raw / safe
        d_raw = xp.where(
            total > 0, (d_weights - (d_weights * w).sum(axis=1, keepdims=True)) / safe, 0
        )
    d_probs = xp.zeros_like(probs)
    xp.put_along_axis(d_probs, expert_idx, d_raw.astype(probs.dtype, copy=False), axis=1)
    if score == "softmax":
        return probs * (d_probs - (d_probs * probs).sum(axis=1, keepdims=True))
    return d_probs * probs * (1 - probs)


def permute(
    x: Any,
    expert_idx: Any,
    n_experts: int,
    capacity: int | None = None,
    weights: Any = None,
    pad_to: int = 1,
) -> tuple[Any, Any, Any]:
    """See :func:`moecore.moe_kernels.permute`."""
    xp = xp_of(x)
    t, k = expert_idx.shape
    experts = expert_idx.reshape(-1).astype(xp.int64)
    flat = xp.arange(t * k)
    if capacity is not None:
        w = weights.reshape(-1)
        # Per expert: highest weight first, earlier assignment first among equals.
        by_priority = xp.lexsort((flat, -w, experts))
        sorted_experts = experts[by_priority]
        starts = xp.searchsorted(sorted_experts, xp.arange(n_experts))
        rank = xp.arange(t * k) - starts[sorted_experts]
        kept = by_priority[rank < capacity]
        flat = xp.sort(kept)
    chosen = experts[flat]
    order_real = flat[xp.argsort(chosen, kind="stable")]
    real_counts = xp.bincount(chosen, minlength=n_experts)
    padded = -(-real_counts // pad_to) * pad_to
    rows = int(padded.sum())
    order = xp.full(rows, -1, dtype=xp.int32)
    starts = xp.concatenate([xp.zeros(1, dtype=padded.dtype), xp.cumsum(padded)[:-1]])
    real_starts = xp.concatenate(
        [xp.zeros(1, dtype=real_counts.dtype), xp.cumsum(real_counts)[:-1]]
    )
    sorted_experts = chosen[xp.argsort(chosen, kind="stable")]
    position = starts[sorted_experts] + (xp.arange(order_real.size) - real_starts[sorted_experts])
    order[position] = order_real
    x_sorted = xp.zeros((rows, x.shape[1]), dtype=x.dtype)
    real = order >= 0
    x_sorted[real] = x[order[real] // k]
    return x_sorted, order, padded.astype(xp.int32)


def unpermute(
    y_sorted: Any,
    order: Any,
    weights: Any = None,
    n_tokens: int | None = None,
    k: int | None = None,
) -> Any:
    """See :func:`moecore.moe_kernels.unpermute`."""
    xp = xp_of(y_sorted)
    t = weights.shape[0] if n_tokens is None else n_tokens
    kk = weights.shape[1] if k is None else k
    y = xp.zeros((t, y_sorted.shape[1]), dtype=y_sorted.dtype)
    real = order >= 0
    flat = order[real].astype(xp.int64)
    rows = y_sorted[real]
    if weights is not None:
        rows = rows * weights.reshape(-1)[flat][:, None]
    xp.add.at(y, flat // kk, rows)
    return y


def permute_backward(dx_sorted: Any, order: Any, n_tokens: int, k: int) -> Any:
    """See :func:`moecore.moe_kernels.permute_backward`."""
    return unpermute(dx_sorted, order, None, n_tokens, k)


def unpermute_backward(dy: Any, y_sorted: Any, order: Any, weights: Any) -> tuple[Any, Any]:
    """See :func:`moecore.moe_kernels.unpermute_backward`."""
    xp = xp_of(dy)
    k = weights.shape[1]
    real = order >= 0
    flat = order[real].astype(xp.int64)
    d_y_sorted = xp.zeros_like(y_sorted)
    d_y_sorted[real] = dy[flat // k] * weights.reshape(-1)[flat][:, None]
    d_weights = xp.zeros(weights.size, dtype=weights.dtype)
    d_weights[flat] = (dy[flat // k] * y_sorted[real]).sum(axis=1)
    return d_y_sorted, d_weights.reshape(weights.shape)


def _blocks(counts: Any) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for e, n in enumerate(int(c) for c in counts):
        out.append((e, start, start + n))
        start += n
    return out


def grouped_matmul(x_sorted: Any, counts: Any, w: Any) -> Any:
    """See :func:`moecore.moe_kernels.grouped_matmul`."""
    xp = xp_of(x_sorted)
    y = xp.zeros((x_sorted.shape[0], w.shape[2]), dtype=x_sorted.dtype)
    for e, a, b in _blocks(counts):
        if b > a:
            y[a:b] = x_sorted[a:b] @ w[e]
    return y


def grouped_matmul_dx(dy: Any, counts: Any, w: Any) -> Any:
    """See :func:`moecore.moe_kernels.grouped_matmul_dx`."""
    xp = xp_of(dy)
    dx = xp.zeros((dy.shape[0], w.shape[1]), dtype=dy.dtype)
    for e, a, b in _blocks(counts):
        if b > a:
            dx[a:b] = dy[a:b] @ w[e].T
    return dx


def grouped_matmul_dw(x_sorted: Any, dy: Any, counts: Any) -> Any:
    """See :func:`moecore.moe_kernels.grouped_matmul_dw`."""
    xp = xp_of(dy)
    dw = xp.zeros((len(counts), x_sorted.shape[1], dy.shape[1]), dtype=dy.dtype)
    for e, a, b in _blocks(counts):
        if b > a:
            dw[e] = x_sorted[a:b].T @ dy[a:b]
    return dw


def gelu_ffn(x_sorted: Any, counts: Any, w1: Any, w2: Any) -> tuple[Any, Any, Any]:
    """See :func:`moecore.moe_kernels.gelu_ffn`."""
    h = grouped_matmul(x_sorted, counts, w1)
    a = gelu_forward(h, "tanh")[0].astype(h.dtype, copy=False)
    return h, a, grouped_matmul(a, counts, w2)


def gelu_ffn_backward(
    x_sorted: Any, counts: Any, w1: Any, w2: Any, h: Any, a: Any, d_y_sorted: Any
) -> tuple[Any, Any, Any]:
    """See :func:`moecore.moe_kernels.gelu_ffn_backward`."""
    d_a = grouped_matmul_dx(d_y_sorted, counts, w2)
    saved = gelu_forward(h, "tanh")[1]
    d_h = gelu_backward(d_a, h, saved, "tanh").astype(h.dtype, copy=False)
    return (
        grouped_matmul_dx(d_h, counts, w1),
        grouped_matmul_dw(x_sorted, d_h, counts),
        grouped_matmul_dw(a, d_y_sorted, counts),
    )


def router_logits(x: Any, router_w: Any) -> Any:
    """See :func:`moecore.moe_kernels.router_logits`."""
    return x @ router_w.T


def router_backward(d_logits: Any, x: Any, router_w: Any, d_x: Any) -> Any:
    """See :func:`moecore.moe_kernels.router_backward`."""
    d_x += d_logits @ router_w
    return d_logits.T @ x
