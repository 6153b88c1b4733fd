"""Rotary position embeddings as a differentiable op on any ``[..., T, ..., dim]`` layout."""

from __future__ import annotations

from typing import Any

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.kernels.attention import apply_rope, rope_backward


class Rotary(Function):
    """``x·cos + rotate_half(x)·sin`` with tables broadcastable against ``x``."""

    @staticmethod
    def forward(ctx: Context, x: Any, cos: Any, sin: Any) -> Any:
        cos, sin = cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False)
        ctx.tables = (cos, sin)
        return apply_rope(x, cos, sin)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return rope_backward(g, *ctx.tables), None, None


def rotary(x: Tensor, cos: Any, sin: Any) -> Tensor:
    """Rotates the last axis of ``x`` (rotate-half layout) by the angles of ``cos``/``sin``,
    arrays that broadcast against ``x`` (e.g. ``[T, 1, dim]`` for ``x [B, T, H, dim]``)."""
    return Rotary.apply(x, cos, sin)
