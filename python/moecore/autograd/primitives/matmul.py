"""Matrix products: batched ``matmul`` and the fused affine map ``linear``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moecore.autograd.function import Context, Function
from moecore.autograd.primitives._shapes import unbroadcast
from moecore.backend import xp_of

if TYPE_CHECKING:
    from moecore.autograd.tensor import Tensor  # Tensor's methods call these


def _swap_last(x: Any) -> Any:
    # A 2-D transpose is free (BLAS takes a flag); stacked ones must be contiguous, or
    # numpy's batched matmul falls back to a slow non-BLAS loop.
    t = x.swapaxes(-1, -2)
    return t if x.ndim == 2 else xp_of(x).ascontiguousarray(t)


class MatMul(Function):
    """``a @ b`` for arrays of at least two dimensions, leading dimensions broadcast."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(
                f"matmul needs inputs with at least 2 dimensions, got {a.shape} and {b.shape}"
            )
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align")
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        ga = unbroadcast(g @ _swap_last(b), a.shape) if na else None
        gb = unbroadcast(_swap_last(a) @ g, b.shape) if nb else None
        return ga, gb


class Linear(Function):
    """``x @ w.T + bias`` over the last axis of ``x``: one GEMM however many leading axes,
    by the kernel chosen for the arrays (:func:`moecore.kernels.linear.linear_kernels`:
    bf16 ``x`` and ``w`` run the bf16 GEMM, bf16 out)."""

    @staticmethod
    def forward(ctx: Context, x: Any, w: Any, bias: Any = None) -> Any:
        if x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"linear: input has {x.shape[-1]} features, weight expects {w.shape[1]}"
            )
        from moecore.kernels.linear import linear_kernels  # the kernels load after Tensor

        x2 = x.reshape(-1, x.shape[-1])
        ctx.kernels = linear_kernels(x2, w, bias)
        y, saved = ctx.kernels.forward(x2, w, bias)
        ctx.save_for_backward(*saved)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        nx, nw, nb = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gx, gw, gb = ctx.kernels.backward(g2, ctx.saved_tensors, nx, nw, nb)
        return (gx.reshape(ctx.x_shape) if gx is not None else None), gw, gb


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Matrix product with broadcasting over leading dimensions."""
    return MatMul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` (weight ``[out, in]``, as in PyTorch)."""
    return Linear.apply(x, weight, bias)
