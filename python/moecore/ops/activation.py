"""Activations and normalised exponentials: GELU, SiLU, SwiGLU, softmax, log-softmax."""

from __future__ import annotations

from typing import Any

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of
from moecore.kernels.activation import erf, gelu_backward, gelu_forward

__all__ = [
    "Gelu",
    "LogSoftmax",
    "Silu",
    "Softmax",
    "SwiGlu",
    "erf",
    "gelu",
    "gelu_backward",
    "gelu_forward",
    "log_softmax",
    "silu",
    "softmax",
    "swiglu",
]


class Gelu(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, approximate: str = "tanh") -> Any:
        out, saved = gelu_forward(x, approximate)
        ctx.save_for_backward(x, saved)
        ctx.approximate = approximate
        return out.astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        x, saved = ctx.saved_tensors
        return gelu_backward(g, x, saved, ctx.approximate).astype(x.dtype, copy=False)


class Silu(Function):
    @staticmethod
    def forward(ctx: Context, x: Any) -> Any:
        s = (0.5 * (1 + xp_of(x).tanh(0.5 * x))).astype(x.dtype, copy=False)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        x, s = ctx.saved_tensors
        return g * s * (1 + x * (1 - s))


class SwiGlu(Function):
    """``silu(a) * b`` where ``a, b`` are the two halves of the last axis of ``x``."""

    @staticmethod
    def forward(ctx: Context, x: Any) -> Any:
        if x.shape[-1] % 2:
            raise ValueError(f"swiglu needs an even last dimension, got {x.shape[-1]}")
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        s = (0.5 * (1 + xp_of(x).tanh(0.5 * a))).astype(x.dtype, copy=False)
        ctx.save_for_backward(a, b, s)
        return a * s * b

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        a, b, s = ctx.saved_tensors
        xp = xp_of(g)
        da = g * b * s * (1 + a * (1 - s))
        db = g * a * s
        return xp.concatenate([da, db], axis=-1)


class Softmax(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, axis: int = -1) -> Any:
        xp = xp_of(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        out = e / e.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (p,) = ctx.saved_tensors
        return p * (g - (g * p).sum(axis=ctx.axis, keepdims=True))


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, axis: int = -1) -> Any:
        xp = xp_of(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (out,) = ctx.saved_tensors
        return g - xp_of(g).exp(out) * g.sum(axis=ctx.axis, keepdims=True)


def gelu(x: Tensor, approximate: str = "tanh") -> Tensor:
    """GELU; ``approximate="tanh"`` (GPT-2's) or ``"none"`` (the erf form)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return Gelu.apply(x, approximate=approximate)


def silu(x: Tensor) -> Tensor:
    """SiLU (swish): ``x * sigmoid(x)``."""
    return Silu.apply(x)


def swiglu(x: Tensor) -> Tensor:
    """SwiGLU gate: ``silu(x[..., :h]) * x[..., h:]`` with ``h`` half the last dimension."""
    return SwiGlu.apply(x)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Softmax along ``axis`` (numerically stable)."""
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Log of the softmax along ``axis`` (numerically stable)."""
    return LogSoftmax.apply(x, axis=axis)
