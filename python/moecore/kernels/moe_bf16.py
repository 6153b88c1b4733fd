"""The MoE kernel family for bf16 numpy arrays (``ml_dtypes.bfloat16``), with the
interface of :class:`moecore.kernels.moe.MoEKernels`.

The expert GEMMs — :func:`grouped_matmul`, its backward forms and the fused GELU FFN — are
the bf16 Rust kernels: bf16 rows and weights in, float32 accumulation, bf16 activations out,
float32 weight gradients. The router runs in float32 as DeepSeek-V3 keeps it (its logits,
probabilities and gradient are float32; ``x`` is widened for its product). The gathers and
weighted sums around the experts (``permute``, ``unpermute`` and their backward) run the
float32 kernels of :mod:`moecore.moe_kernels` on widened copies and store their activation
results in bf16 (they move ``T·k`` rows once; the GEMMs are where the work is).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import _core
from moecore import moe_kernels as f32
from moecore.kernels.bf16 import BF16, bits, from_bits, widen


def _wide(a: Any) -> Any:
    return widen(a) if isinstance(a, np.ndarray) and a.dtype == BF16 else a


def _counts(counts: Any) -> np.ndarray:
    return np.ascontiguousarray(counts, dtype=np.int32)


def router_logits(x: np.ndarray, router_w: np.ndarray) -> np.ndarray:
    """``x @ router_w.T`` in float32 (the router's logits stay float32)."""
    return f32.router_logits(_wide(x), np.ascontiguousarray(_wide(router_w)))


def route(
    logits: np.ndarray,
    k: int,
    score: f32.Score = "softmax",
    bias: np.ndarray | None = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`moecore.moe_kernels.route` on float32 logits."""
    return f32.route(_wide(logits), k, score, _wide(bias), n_groups, topk_groups, normalize)


def route_backward(
    d_weights: np.ndarray,
    expert_idx: np.ndarray,
    probs: np.ndarray,
    score: f32.Score = "softmax",
    normalize: bool = True,
) -> np.ndarray:
    """:func:`moecore.moe_kernels.route_backward` (float32)."""
    return f32.route_backward(_wide(d_weights), expert_idx, _wide(probs), score, normalize)


def permute(
    x: np.ndarray,
    expert_idx: np.ndarray,
    n_experts: int,
    capacity: int | None = None,
    weights: np.ndarray | None = None,
    pad_to: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`moecore.moe_kernels.permute`; ``x_sorted`` in bf16. Without a capacity or
    padding the rows are gathered as they are (a stable sort of the flat assignments by
    expert, as the kernel orders them), with no float32 copy."""
    flat = np.asarray(expert_idx).reshape(-1)
    if (
        capacity is None
        and pad_to == 1
        and expert_idx.ndim == 2
        and x.ndim == 2
        and x.shape[0] == expert_idx.shape[0]
        and flat.size
        and 0 <= int(flat.min())
        and int(flat.max()) < n_experts
    ):
        order = np.argsort(flat, kind="stable").astype(np.int32)
        counts = np.bincount(flat, minlength=n_experts).astype(np.int32)
        return from_bits(bits(x)[order // expert_idx.shape[1]]), order, counts
    x_sorted, order, counts = f32.permute(
        _wide(x), expert_idx, n_experts, capacity, _wide(weights), pad_to
    )
    return x_sorted.astype(BF16), order, counts


def unpermute(
    y_sorted: np.ndarray,
    order: np.ndarray,
    weights: np.ndarray | None = None,
    n_tokens: int | None = None,
    k: int | None = None,
) -> np.ndarray:
    """:func:`moecore.moe_kernels.unpermute` summed in float32, the result in bf16."""
    return f32.unpermute(_wide(y_sorted), order, _wide(weights), n_tokens, k).astype(BF16)


def unpermute_backward(
    dy: np.ndarray, y_sorted: np.ndarray, order: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`moecore.moe_kernels.unpermute_backward`: ``d_y_sorted`` in bf16,
    ``d_weights`` float32."""
    d_y_sorted, d_weights = f32.unpermute_backward(
        np.ascontiguousarray(_wide(dy)), _wide(y_sorted), order, _wide(weights)
    )
    return d_y_sorted.astype(BF16), d_weights


def permute_backward(dx_sorted: np.ndarray, order: np.ndarray, n_tokens: int, k: int) -> np.ndarray:
    """:func:`moecore.moe_kernels.permute_backward` summed in float32, the result in bf16."""
    return f32.permute_backward(_wide(dx_sorted), order, n_tokens, k).astype(BF16)


def grouped_matmul(x_sorted: np.ndarray, counts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each expert's block of bf16 rows times its bf16 matrix → ``[R, d_out]`` bf16
    (float32 accumulation)."""
    return from_bits(_core.moe_grouped_matmul_bf16(bits(x_sorted), _counts(counts), bits(w)))


def grouped_matmul_dx(dy: np.ndarray, counts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gradient of :func:`grouped_matmul` with respect to ``x_sorted`` (bf16)."""
    return from_bits(_core.moe_grouped_matmul_dx_bf16(bits(dy), _counts(counts), bits(w)))


def grouped_matmul_dw(x_sorted: np.ndarray, dy: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Gradient of :func:`grouped_matmul` with respect to ``w``: ``[E, d_in, d_out]``
    float32."""
    result: np.ndarray = _core.moe_grouped_matmul_dw_bf16(bits(x_sorted), bits(dy), _counts(counts))
    return result


def gelu_ffn(
    x_sorted: np.ndarray, counts: np.ndarray, w1: np.ndarray, w2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GELU expert FFN on bf16 rows and weights → ``(h, a, y_sorted)`` in bf16 (each
    GEMM accumulated in float32, the GELU in float32, ``y`` from the unrounded ``a``)."""
    h, a, y = _core.moe_gelu_ffn_bf16(bits(x_sorted), _counts(counts), bits(w1), bits(w2))
    return from_bits(h), from_bits(a), from_bits(y)


def gelu_ffn_backward(
    x_sorted: np.ndarray,
    counts: np.ndarray,
    w1: np.ndarray,
    w2: np.ndarray,
    h: np.ndarray,
    a: np.ndarray,
    d_y_sorted: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient of :func:`gelu_ffn` → ``(d_x_sorted bf16, d_w1 float32, d_w2 float32)``."""
    d_x, d_w1, d_w2 = _core.moe_gelu_ffn_backward_bf16(
        bits(x_sorted),
        _counts(counts),
        bits(w1),
        bits(w2),
        bits(h),
        bits(a),
        bits(np.asarray(d_y_sorted).astype(BF16, copy=False)),
    )
    return from_bits(d_x), d_w1, d_w2


def router_backward(
    d_logits: np.ndarray, x: np.ndarray, router_w: np.ndarray, d_x: np.ndarray
) -> np.ndarray:
    """Adds ``d_logits @ router_w`` to the bf16 ``d_x`` in place (summed in float32, rounded
    once) and returns ``d_router_w = d_logits.T @ x`` (float32)."""
    d_x32 = np.ascontiguousarray(_wide(d_x))
    d_router: np.ndarray = f32.router_backward(
        _wide(d_logits), _wide(x), np.ascontiguousarray(_wide(router_w)), d_x32
    )
    if d_x32 is not d_x:
        d_x[...] = d_x32.astype(d_x.dtype)
    return d_router
