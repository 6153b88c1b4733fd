"""Dropout (inverted: kept activations are scaled by 1/(1-p) during training)."""

from __future__ import annotations

from typing import Any

from moecore.autograd.function import Context, Function
from moecore.autograd.random import generator
from moecore.autograd.tensor import Tensor


class Dropout(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, mask: Any) -> Any:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (mask,) = ctx.saved_tensors
        return g * mask, None


def dropout(x: Tensor, p: float = 0.1, training: bool = True) -> Tensor:
    """Zeroes each element with probability ``p`` and scales the rest by ``1/(1-p)``;
    the identity when not training or ``p == 0``. Uses the default generator."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    keep = generator(x.device).random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return Dropout.apply(x, mask)
