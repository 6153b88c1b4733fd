"""Embedding lookup (a row gather) and its scatter-add backward."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import is_bf16, widen_bf16, xp_of


class EmbeddingFn(Function):
    @staticmethod
    def forward(ctx: Context, ids: Any, weight: Any) -> Any:
        if ids.dtype.kind not in "iu":
            raise TypeError(f"embedding: ids must be integers, got {ids.dtype}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise ValueError(
                f"embedding: ids must lie in [0, {weight.shape[0]}), got range "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )
        ctx.save_for_backward(ids)
        ctx.weight_shape = weight.shape
        # A bf16 table (a compute copy) gets its gradient in float32, as its master keeps it.
        ctx.dtype = np.float32 if is_bf16(weight.dtype) else weight.dtype
        return weight[ids]

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        (ids,) = ctx.saved_tensors
        xp = xp_of(g)
        gw = xp.zeros(ctx.weight_shape, dtype=ctx.dtype)
        if is_bf16(g.dtype):  # bf16 rows: summed in float32 (numpy's bf16 ufuncs are slow)
            g = widen_bf16(g)
        flat, rows = ids.reshape(-1), g.reshape(-1, ctx.weight_shape[1])
        if xp is np and flat.size:
            # Sorted segment sums: numpy's add.at is an unbuffered per-element loop, many
            # times slower than one gather and a vectorised reduceat.
            order = np.argsort(flat, kind="stable")
            sorted_ids = flat[order]
            starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
            gw[sorted_ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
        else:
            xp.add.at(gw, flat, rows)
        return None, gw


def embedding(ids: Any, weight: Tensor) -> Tensor:
    """Rows of ``weight [V, d]`` at integer ``ids [...]`` → ``[..., d]``."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    return EmbeddingFn.apply(ids, weight)
