"""Block-sparse linear: ``y = x · Wᵀ + b`` with ``W`` stored as BSR blocks; backward computes
``dx`` with the transposed pattern and ``dW`` only at the kept blocks (SDDMM), so pruned
blocks cost nothing in either direction."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of
from moecore.sparse import BsrMatrix, bsr_linear, bsr_linear_dw, bsr_linear_dx


def _block_coords(pattern: BsrMatrix) -> tuple[np.ndarray, np.ndarray]:
    rows = np.repeat(np.arange(len(pattern.indptr) - 1), np.diff(pattern.indptr))
    return rows, np.asarray(pattern.indices)


def _dense(data: Any, pattern: BsrMatrix) -> Any:
    """The dense ``[out, in]`` matrix of BSR blocks (any dtype; the generic path)."""
    xp = xp_of(data)
    b = pattern.block
    rows, cols = _block_coords(pattern)
    w = xp.zeros((pattern.shape[0] // b, b, pattern.shape[1] // b, b), dtype=data.dtype)
    w[rows, :, cols, :] = data
    return w.reshape(pattern.shape)


def _blocks_of(full: Any, pattern: BsrMatrix) -> Any:
    b = pattern.block
    rows, cols = _block_coords(pattern)
    tiles = full.reshape(pattern.shape[0] // b, b, pattern.shape[1] // b, b)
    return tiles[rows, :, cols, :]


class BsrLinearFn(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, data: Any, bias: Any, *, pattern: BsrMatrix) -> Any:
        fast = all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in (x, data)) and (
            bias is None or bias.dtype == np.float32
        )
        x = x if x.flags.c_contiguous else np.ascontiguousarray(x)
        ctx.save_for_backward(x, data)
        ctx.pattern, ctx.fast = pattern, fast
        if fast:
            w = BsrMatrix.__new__(BsrMatrix)
            for slot in ("_pattern", "block", "indices", "indptr", "shape"):
                object.__setattr__(w, slot, getattr(pattern, slot))
            w.data = data  # the parameter's current array (the pattern is validated once)
            ctx.w = w
            return bsr_linear(x, w, bias)
        y = x @ _dense(data, pattern).T
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        x, data = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad
        g = xp_of(g).ascontiguousarray(g)
        lead = tuple(range(g.ndim - 1))
        gb = g.sum(axis=lead) if nb else None
        if ctx.fast:
            gx = bsr_linear_dx(g, ctx.w) if nx else None
            gw = bsr_linear_dw(g, x, ctx.w) if nw else None
            return gx, gw, gb
        dense = _dense(data, ctx.pattern)
        gx = g @ dense if nx else None
        gw = None
        if nw:
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            gw = _blocks_of(g2.T @ x2, ctx.pattern)
        return gx, gw, gb


def block_sparse_linear(
    x: Tensor, data: Tensor, pattern: BsrMatrix, bias: Tensor | None = None
) -> Tensor:
    """``x · Wᵀ (+ bias)`` where ``W`` has ``pattern``'s kept blocks with values ``data``
    ``[nnzb, B, B]``; float32 CPU runs the Rust kernels, other dtypes a dense reference."""
    return BsrLinearFn.apply(x, data, bias, pattern=pattern)
