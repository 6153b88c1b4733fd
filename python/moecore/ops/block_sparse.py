"""Block-sparse linear: ``y = x · Wᵀ + b`` with ``W`` stored as BSR blocks; backward computes
``dx`` with the transposed pattern and ``dW`` only at the kept blocks (SDDMM), so pruned
blocks cost nothing in either direction."""

from __future__ import annotations

from typing import Any

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of
from moecore.kernels.registry import select_for
from moecore.sparse import BsrMatrix


class BsrLinearFn(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, data: Any, bias: Any, *, pattern: BsrMatrix) -> Any:
        x = x if x.flags.c_contiguous else xp_of(x).ascontiguousarray(x)
        ctx.save_for_backward(x)
        w = BsrMatrix.__new__(BsrMatrix)
        for slot in ("_device", "_pattern", "block", "indices", "indptr", "shape"):
            object.__setattr__(w, slot, getattr(pattern, slot))
        w.data = data  # the parameter's current array (the pattern is validated once)
        ctx.w, ctx.kernels = w, select_for("bsr", x, data, bias)
        return ctx.kernels.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (x,) = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad
        g = xp_of(g).ascontiguousarray(g)
        lead = tuple(range(g.ndim - 1))
        gb = g.sum(axis=lead) if nb else None
        gx = ctx.kernels.linear_dx(g, ctx.w) if nx else None
        gw = ctx.kernels.linear_dw(g, x, ctx.w) if nw else None
        return gx, gw, gb


def block_sparse_linear(
    x: Tensor, data: Tensor, pattern: BsrMatrix, bias: Tensor | None = None
) -> Tensor:
    """``x · Wᵀ (+ bias)`` where ``W`` has ``pattern``'s kept blocks with values ``data``
    ``[nnzb, B, B]``; float32 runs the BSR kernels (Rust on CPU, CUDA on CuPy), other dtypes
    a dense reference."""
    return BsrLinearFn.apply(x, data, bias, pattern=pattern)
