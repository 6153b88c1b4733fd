"""Elementwise arithmetic with broadcasting, and pointwise functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moecore.autograd.function import Context, Function
from moecore.autograd.primitives._shapes import shape_of, unbroadcast
from moecore.backend import is_bf16, xp_of

if TYPE_CHECKING:
    from moecore.autograd.tensor import Tensor  # Tensor's methods call these


def _meta(x: Any) -> tuple[tuple[int, ...], Any]:
    return shape_of(x), getattr(x, "dtype", None)


def _grad_for(g: Any, x: Any, needed: bool) -> Any:
    """``g`` reduced to the shape and dtype of input ``x`` (an array or its ``_meta``)."""
    if not needed:
        return None
    shape, dtype = x if isinstance(x, tuple) else _meta(x)
    out = unbroadcast(g, shape)
    if dtype is None or (is_bf16(dtype) and out.dtype.kind == "f"):
        # A bf16 operand's gradient summed over broadcast axes stays float32 (the engine
        # stores it in the operand's format: float32 for a parameter's compute copy).
        return out
    return out.astype(dtype, copy=False)


class Add(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.a, ctx.b = _meta(a), _meta(b)  # backward needs only shapes and dtypes
        return a + b

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        na, nb = ctx.needs_input_grad
        return _grad_for(g, ctx.a, na), _grad_for(g, ctx.b, nb)


class Sub(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.a, ctx.b = _meta(a), _meta(b)
        return a - b

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        na, nb = ctx.needs_input_grad
        return _grad_for(g, ctx.a, na), (None if not nb else _grad_for(-g, ctx.b, nb))


class Mul(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        return (_grad_for(g * b, a, na) if na else None), (_grad_for(g * a, b, nb) if nb else None)


class Div(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        ga = _grad_for(g / b, a, na) if na else None
        gb = _grad_for(-g * a / (b * b), b, nb) if nb else None
        return ga, gb


class Neg(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        return -a

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return -g


class Pow(Function):
    """``a ** p`` for a constant exponent ``p``."""

    @staticmethod
    def forward(ctx: Context, a: Any, p: float) -> Any:
        ctx.save_for_backward(a)
        ctx.p = p
        return a**p

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (a,) = ctx.saved_tensors
        return (g * ctx.p * a ** (ctx.p - 1)).astype(a.dtype, copy=False), None


class Exp(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = xp_of(a).exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (out,) = ctx.saved_tensors
        return g * out


class Log(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return xp_of(a).log(a)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (a,) = ctx.saved_tensors
        return g / a


class Tanh(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = xp_of(a).tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (out,) = ctx.saved_tensors
        return g * (1 - out * out)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        xp = xp_of(a)
        out = (0.5 * (1 + xp.tanh(0.5 * a))).astype(a.dtype, copy=False)  # overflow-free
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (out,) = ctx.saved_tensors
        return g * out * (1 - out)


class Relu(Function):
    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        mask = a > 0
        ctx.save_for_backward(mask)
        return a * mask

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (mask,) = ctx.saved_tensors
        return g * mask


class Cast(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, dtype: Any) -> Any:
        ctx.dtype = a.dtype
        return a.astype(dtype)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g.astype(ctx.dtype), None


def add(a: Any, b: Any) -> Tensor:
    """``a + b`` with broadcasting."""
    return Add.apply(a, b)


def sub(a: Any, b: Any) -> Tensor:
    """``a - b`` with broadcasting."""
    return Sub.apply(a, b)


def mul(a: Any, b: Any) -> Tensor:
    """``a * b`` with broadcasting."""
    return Mul.apply(a, b)


def div(a: Any, b: Any) -> Tensor:
    """``a / b`` with broadcasting."""
    return Div.apply(a, b)


def neg(a: Tensor) -> Tensor:
    """``-a``."""
    return Neg.apply(a)


def pow(a: Tensor, p: float) -> Tensor:
    """``a ** p`` for a constant exponent."""
    return Pow.apply(a, float(p))


def exp(a: Tensor) -> Tensor:
    """Elementwise ``e ** a``."""
    return Exp.apply(a)


def log(a: Tensor) -> Tensor:
    """Elementwise natural logarithm."""
    return Log.apply(a)


def tanh(a: Tensor) -> Tensor:
    """Elementwise hyperbolic tangent."""
    return Tanh.apply(a)


def sigmoid(a: Tensor) -> Tensor:
    """Elementwise logistic function."""
    return Sigmoid.apply(a)


def relu(a: Tensor) -> Tensor:
    """Elementwise ``max(a, 0)``."""
    return Relu.apply(a)


def cast(a: Tensor, dtype: Any) -> Tensor:
    """``a`` converted to ``dtype`` (the gradient is converted back)."""
    return Cast.apply(a, dtype)
