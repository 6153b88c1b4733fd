"""MoE routing, permutation and their backward: the host code of ``cuda/moe.cu``.

:mod:`moecore.kernels.cuda.moe_kernels` wraps these under :mod:`moecore.moe_kernels`'s names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.kernels.cuda.launch import (
    THREADS,
    Backend,
    check_array,
    i32,
    int32_count,
    launch_grid,
    resolve_backend,
)


def moe_route(
    logits: Any,
    k: int,
    score: str = "softmax",
    bias: Any = None,
    normalize: bool = True,
    backend: Backend | None = None,
) -> tuple[Any, Any, Any]:
    """``(expert_idx [T, k] int32, weights [T, k], probs [T, E])``; see
    :func:`moecore.moe_kernels.route` (group-limited routing has no GPU kernel)."""
    be = resolve_backend(backend)
    xp = be.xp
    logits = check_array(be, logits, "logits", np.float32, 2)
    t, e = logits.shape
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f'score: expected "softmax" or "sigmoid", got {score!r}')
    if not 1 <= k <= e:
        raise ValueError(f"k must be in [1, E = {e}], got {k}")
    if bias is not None:
        bias = check_array(be, bias, "bias", np.float32, 1)
        if bias.shape != (e,):
            raise ValueError(f"bias: expected shape ({e},), got {bias.shape}")
    idx = xp.empty((t, k), np.int32)
    w = xp.empty((t, k), np.float32)
    probs = xp.empty((t, e), np.float32)
    if t:
        be.launch(
            "moe",
            "moe_route",
            (launch_grid(t),),
            (THREADS,),
            logits,
            bias,
            i32(t),
            i32(e),
            i32(k),
            i32(0 if score == "softmax" else 1),
            i32(int(normalize)),
            idx,
            w,
            probs,
        )
    return idx, w, probs


def moe_permute(
    x: Any, expert_idx: Any, n_experts: int, pad_to: int = 1, backend: Backend | None = None
) -> tuple[Any, Any, Any]:
    """``(x_sorted, order, counts)``; see :func:`moecore.moe_kernels.permute` (without
    ``capacity``: dropping by capacity has no GPU kernel)."""
    be = resolve_backend(backend)
    xp = be.xp
    x = check_array(be, x, "x", np.float32, 2)
    expert_idx = check_array(be, expert_idx, "expert_idx", np.int32, 2)
    t, k = expert_idx.shape
    if x.shape[0] != t:
        raise ValueError(f"x has {x.shape[0]} rows, expert_idx {t}")
    if not 1 <= n_experts <= 1024:
        raise ValueError(f"n_experts must be in [1, 1024] on the GPU, got {n_experts}")
    if pad_to < 1:
        raise ValueError(f"pad_to must be at least 1, got {pad_to}")
    if expert_idx.size and (int(expert_idx.min()) < 0 or int(expert_idx.max()) >= n_experts):
        raise ValueError(f"expert_idx: values must be in [0, {n_experts})")
    n = int(expert_idx.size)
    counts = xp.zeros(n_experts, np.int32)
    if n:
        be.launch(
            "moe",
            "moe_count",
            (launch_grid(n),),
            (THREADS,),
            expert_idx,
            i32(n),
            i32(n_experts),
            counts,
        )
    # Padding and the experts' first rows on the host, in int64 (at most 1024 experts): in
    # int32 a large pad_to wraps, and wrapped starts would send moe_build_order's writes out
    # of `order`. The sizes are checked before anything of that size is allocated.
    padded_h = -(-be.to_host(counts).astype(np.int64) // pad_to) * pad_to
    d = int(x.shape[1])
    rows = int32_count(int(padded_h.sum()), "the padded row count")
    int32_count(rows * d, f"{rows} sorted rows x d = {d}")
    padded = xp.asarray(padded_h.astype(np.int32))
    starts = xp.asarray((np.cumsum(padded_h) - padded_h).astype(np.int32))
    order = xp.full(rows, -1, np.int32)
    pos = xp.full(n, -1, np.int32)
    if n:
        be.launch(
            "moe",
            "moe_build_order",
            (1,),
            (THREADS,),
            expert_idx,
            i32(n),
            i32(n_experts),
            starts,
            order,
            pos,
        )
    x_sorted = xp.empty((rows, d), np.float32)
    if rows * d:
        be.launch(
            "moe",
            "moe_permute_rows",
            (launch_grid(rows * d),),
            (THREADS,),
            x,
            order,
            i32(rows * d),
            i32(d),
            i32(k),
            x_sorted,
        )
    return x_sorted, order, padded


def _positions(be: Backend, order: Any, n_tokens: int, k: int) -> Any:
    """``pos[f]`` = the sorted row holding assignment f (-1 if dropped): order's inverse.

    Validates ``order`` as the CPU does (values in ``[-1, T*k)``, no assignment twice, T*k
    below 2^31): the kernels index ``pos``, the weights and ``d_weights`` with its values, and
    an assignment held by two rows would be written by two warps at once."""
    xp = be.xp
    n_assign = int32_count(n_tokens * k, f"n_tokens * k = {n_tokens} * {k}")
    if order.size and (int(order.min()) < -1 or int(order.max()) >= n_assign):
        raise ValueError(f"order: values must be in [-1, {n_assign})")
    pos = xp.full(n_assign, -1, np.int32)
    rows = xp.nonzero(order >= 0)[0]
    if rows.size:
        pos[order[rows]] = rows.astype(np.int32)
        if int((pos >= 0).sum()) != int(rows.size):
            raise ValueError("order: an assignment appears in more than one row")
    return pos


def moe_unpermute(
    y_sorted: Any,
    order: Any,
    weights: Any = None,
    n_tokens: int | None = None,
    k: int | None = None,
    backend: Backend | None = None,
) -> Any:
    """``y [T, d]``; see :func:`moecore.moe_kernels.unpermute` (weights may be None, given
    ``n_tokens`` and ``k``: that is permute's backward)."""
    be = resolve_backend(backend)
    xp = be.xp
    y_sorted = check_array(be, y_sorted, "y_sorted", np.float32, 2)
    order = check_array(be, order, "order", np.int32, 1)
    if weights is not None:
        weights = check_array(be, weights, "weights", np.float32, 2)
        n_tokens, k = weights.shape
    if n_tokens is None or k is None or k < 1:
        raise ValueError("unpermute needs weights, or n_tokens and k >= 1")
    if order.shape[0] != y_sorted.shape[0]:
        raise ValueError(f"order has {order.shape[0]} rows, y_sorted {y_sorted.shape[0]}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    d = int(y_sorted.shape[1])
    int32_count(n_tokens * d, f"n_tokens * d = {n_tokens} * {d}")
    pos = _positions(be, order, n_tokens, k)
    y = xp.empty((n_tokens, d), np.float32)
    if n_tokens * d:
        be.launch(
            "moe",
            "moe_unpermute",
            (launch_grid(n_tokens * d),),
            (THREADS,),
            y_sorted,
            pos,
            weights,
            i32(n_tokens * d),
            i32(d),
            i32(k),
            y,
        )
    return y


def moe_permute_backward(
    dx_sorted: Any, order: Any, n_tokens: int, k: int, backend: Backend | None = None
) -> Any:
    """``dx [T, d]``: each token's sorted rows summed back; see
    :func:`moecore.moe_kernels.permute_backward`."""
    return moe_unpermute(dx_sorted, order, None, n_tokens, k, backend)


def moe_unpermute_backward(
    dy: Any, y_sorted: Any, order: Any, weights: Any, backend: Backend | None = None
) -> tuple[Any, Any]:
    """``(d_y_sorted, d_weights)``; see :func:`moecore.moe_kernels.unpermute_backward`."""
    be = resolve_backend(backend)
    xp = be.xp
    dy = check_array(be, dy, "dy", np.float32, 2)
    y_sorted = check_array(be, y_sorted, "y_sorted", np.float32, 2)
    order = check_array(be, order, "order", np.int32, 1)
    weights = check_array(be, weights, "weights", np.float32, 2)
    t, k = weights.shape
    rows, d = y_sorted.shape
    if dy.shape != (t, d) or order.shape != (rows,):
        raise ValueError(
            f"dy must be ({t}, {d}) and order ({rows},); got {dy.shape}, {order.shape}"
        )
    _positions(be, order, t, k)  # validation only: the kernel reads weights[order[r]]
    d_y_sorted = xp.empty((rows, d), np.float32)
    d_weights = xp.zeros((t, k), np.float32)
    if rows:
        warps_per_block = THREADS // 32
        be.launch(
            "moe",
            "moe_unpermute_backward",
            (-(-rows // warps_per_block),),
            (THREADS,),
            dy,
            y_sorted,
            order,
            weights,
            i32(rows),
            i32(d),
            i32(k),
            d_y_sorted,
            d_weights,
        )
    return d_y_sorted, d_weights
