"""Reductions: sum, mean, max."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moecore.autograd.function import Context, Function
from moecore.autograd.primitives._shapes import normalize_axes
from moecore.backend import xp_of

if TYPE_CHECKING:
    from moecore.autograd.tensor import Tensor  # Tensor's methods call these


def _expand(g: Any, shape: tuple[int, ...], axes: tuple[int, ...] | None, keepdims: bool) -> Any:
    """Reshapes a reduced gradient so it broadcasts against the input shape."""
    if axes is None:
        return g.reshape((1,) * len(shape)) if not keepdims else g
    if not keepdims:
        g = xp_of(g).expand_dims(g, axes)
    return g


class Sum(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        ctx.shape = a.shape
        ctx.axes = normalize_axes(axis, a.ndim)
        ctx.keepdims = keepdims
        return xp_of(a).asarray(a.sum(axis=ctx.axes, keepdims=keepdims))

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        g = _expand(g, ctx.shape, ctx.axes, ctx.keepdims)
        return xp_of(g).broadcast_to(g, ctx.shape).copy()


class Mean(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        ctx.shape = a.shape
        ctx.axes = normalize_axes(axis, a.ndim)
        ctx.keepdims = keepdims
        reduced = a.size if ctx.axes is None else 1
        if ctx.axes is not None:
            for ax in ctx.axes:
                reduced *= a.shape[ax]
        ctx.count = reduced or 1  # mean of nothing: numpy gives nan, gradient is empty
        return xp_of(a).asarray(a.mean(axis=ctx.axes, keepdims=keepdims))

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        g = _expand(g, ctx.shape, ctx.axes, ctx.keepdims) / g.dtype.type(ctx.count)
        return xp_of(g).broadcast_to(g, ctx.shape).copy()


class Max(Function):
    """Max over axes; the gradient goes to the maxima, split evenly between ties."""

    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        axes = normalize_axes(axis, a.ndim)
        out = a.max(axis=axes, keepdims=True)
        mask = a == out
        ctx.save_for_backward(mask)
        ctx.axes, ctx.keepdims, ctx.shape = axes, keepdims, a.shape
        squeezed = out.reshape(()) if axes is None else out.squeeze(axis=axes)
        return xp_of(a).asarray(out if keepdims else squeezed)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (mask,) = ctx.saved_tensors
        g = _expand(g, ctx.shape, ctx.axes, ctx.keepdims)
        ties = mask.sum(axis=ctx.axes, keepdims=True)
        return (mask * (g / ties)).astype(g.dtype, copy=False)


def sum(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """Sum over ``axis`` (all axes by default)."""
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis`` (all axes by default)."""
    return Mean.apply(a, axis=axis, keepdims=keepdims)


def max(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """Maximum over ``axis``; ties share the gradient evenly."""
    return Max.apply(a, axis=axis, keepdims=keepdims)
