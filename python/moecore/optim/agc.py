"""Adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization", NFNets): each unit's gradient is clipped to
``clip_factor · max(‖w‖, eps)`` of that unit's weights, so a step can change no unit by more
than a fixed fraction of its size, whatever the global gradient norm is."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of


def unitwise_norm(x: Any) -> Any:
    """Norms of the units of ``x``, broadcastable against it: the whole tensor for a vector
    or scalar (a bias, a norm's gain), else each slice along axis 1 — a Linear's output
    row ``[out, in]``, an embedding's row, an expert's output column ``[E, in, out]``."""
    xp = xp_of(x)
    if x.ndim <= 1:
        return xp.sqrt((x * x).sum())
    return xp.sqrt((x * x).sum(axis=1, keepdims=True))


def adaptive_clip_grad_(parameters: Iterable[Tensor], clip_factor: float, eps: float = 1e-3) -> int:
    """Scales, in place, the gradient of every unit whose norm exceeds
    ``clip_factor · max(‖w_unit‖, eps)`` down to that bound; returns how many units were
    clipped. Non-finite gradients are left as they are (the trainer skips such steps)."""
    if not clip_factor > 0:
        raise ValueError(f"clip_factor must be positive, got {clip_factor}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    clipped = 0
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        xp = xp_of(g)
        w_norm = xp.maximum(unitwise_norm(p.data).astype(g.dtype), g.dtype.type(eps))
        max_norm = w_norm * g.dtype.type(clip_factor)
        g_norm = unitwise_norm(g)
        over = g_norm > max_norm  # False for NaN: non-finite units stay as they are
        clipped += int(over.sum())
        scale = xp.where(over, max_norm / xp.maximum(g_norm, g.dtype.type(1e-6)), 1)
        g *= scale.astype(g.dtype, copy=False)
    return clipped
