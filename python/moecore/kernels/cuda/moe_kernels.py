"""The MoE kernels for float32 CuPy arrays: same names, arguments and semantics as
:mod:`moecore.moe_kernels`, running the CUDA kernels of ``cuda/moe.cu`` (routing,
permutation and their backward scatters) and CuPy's cuBLAS matmuls (the grouped matmuls and
the routing backward, via :mod:`moecore.kernels.generic`).

Group-limited routing (``n_groups``/``topk_groups``) and capacity dropping have no GPU kernel
yet and raise ``NotImplementedError`` naming the operation.
"""

from __future__ import annotations

from typing import Any

from moecore.kernels import generic
from moecore.kernels.cuda import moe

grouped_matmul = generic.grouped_matmul
grouped_matmul_dx = generic.grouped_matmul_dx
grouped_matmul_dw = generic.grouped_matmul_dw
route_backward = generic.route_backward
gelu_ffn = generic.gelu_ffn
gelu_ffn_backward = generic.gelu_ffn_backward
router_logits = generic.router_logits
router_backward = generic.router_backward


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
    if n_groups is not None or topk_groups is not None:
        raise NotImplementedError("moe route with n_groups/topk_groups has no GPU kernel yet")
    return moe.moe_route(logits, k, score, bias, normalize)


def permute(
    x: Any,
    expert_idx: Any,
    n_experts: int,
    capacity: int | None = None,
    weights: Any = None,
    pad_to: int = 1,
) -> tuple[Any, Any, Any]:
    """See :func:`moecore.moe_kernels.permute`."""
    if capacity is not None:
        raise NotImplementedError("moe permute with a capacity has no GPU kernel yet")
    return moe.moe_permute(x, expert_idx, n_experts, pad_to)


def unpermute(
    y_sorted: Any,
    order: Any,
    weights: Any = None,
    n_tokens: int | None = None,
    k: int | None = None,
) -> Any:
    """See :func:`moecore.moe_kernels.unpermute`."""
    return moe.moe_unpermute(y_sorted, order, weights, n_tokens, k)


def permute_backward(dx_sorted: Any, order: Any, n_tokens: int, k: int) -> Any:
    """See :func:`moecore.moe_kernels.permute_backward`."""
    return moe.moe_permute_backward(dx_sorted, order, n_tokens, k)


def unpermute_backward(dy: Any, y_sorted: Any, order: Any, weights: Any) -> tuple[Any, Any]:
    """See :func:`moecore.moe_kernels.unpermute_backward`."""
    return moe.moe_unpermute_backward(dy, y_sorted, order, weights)
