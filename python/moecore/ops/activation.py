"""Activations and normalised exponentials: GELU, SiLU, SwiGLU, softmax, log-softmax."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore import _core
from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def erf(x: Any) -> Any:
    """Elementwise error function (numpy has none): Abramowitz & Stegun 7.1.26, |error| ≤
    1.5e-7, enough for float32 GELU."""
    xp = xp_of(x)
    s = xp.sign(x)
    a = xp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return (s * (1.0 - poly * xp.exp(-a * a))).astype(x.dtype, copy=False)


def _fast(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous


def gelu_forward(x: Any, approximate: str) -> tuple[Any, Any]:
    """GELU of ``x`` and what its backward needs (shared with the fused MoE expert FFN)."""
    xp = xp_of(x)
    if approximate == "tanh" and _fast(x):
        return _core.fused_gelu(x), None
    if approximate == "tanh":
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        t = xp.tanh(inner)
        return 0.5 * x * (1.0 + t), t
    cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))
    return x * cdf, cdf


def gelu_backward(g: Any, x: Any, saved: Any, approximate: str) -> Any:
    """Gradient of GELU given ``saved`` from :func:`gelu_forward`."""
    xp = xp_of(x)
    if approximate == "tanh" and saved is None:
        return _core.fused_gelu_backward(xp.ascontiguousarray(g, dtype=x.dtype), x)
    if approximate == "tanh":
        t = saved
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner)
    pdf = xp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2 * math.pi))
    return g * (saved + x * pdf)


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
