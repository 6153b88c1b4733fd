"""Gradient clipping by global norm."""

from __future__ import annotations

import math
from collections.abc import Iterable

from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of


def grad_norm(parameters: Iterable[Tensor], norm_type: float = 2.0) -> float:
    """The norm of all gradients taken together (parameters without a gradient count 0)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if math.isinf(norm_type):
        return max(float(xp_of(g).abs(g).max()) if g.size else 0.0 for g in grads)
    total = 0.0
    for g in grads:
        if norm_type == 2.0:
            flat = g.reshape(-1)
            total += float(flat @ flat)
        else:
            total += float((xp_of(g).abs(g) ** norm_type).sum())
    return total ** (1.0 / norm_type)


def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> float:
    """Scales all gradients in place so their global norm is at most ``max_norm``; returns
    the norm before clipping. A non-finite norm is returned as is and nothing is scaled
    (the caller decides: the trainer skips such a step)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm(params, norm_type)
    if math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad *= p.grad.dtype.type(scale)
    return norm
