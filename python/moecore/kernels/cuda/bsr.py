"""Block-sparse (BSR) products: the host code of ``cuda/bsr.cu``."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.kernels.cuda.launch import (
    THREADS,
    check_array,
    i32,
    int32_count,
    launch_grid,
    resolve_backend,
)


class BsrDevice:
    """A BSR pattern's index arrays on the device, in the kernels' int32 form, plus the
    transposed (block-column) view ``bsr_dx`` needs; built once per pattern."""

    def __init__(
        self, shape: tuple[int, int], block: int, indptr: Any, indices: Any, backend: Any = None
    ) -> None:
        be = resolve_backend(backend)
        xp = be.xp
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = int(block)
        ip = np.asarray(indptr, dtype=np.int64).reshape(-1)
        ix = np.asarray(indices, dtype=np.int64).reshape(-1)
        _check_bsr_pattern(self.shape, self.block, ip, ix)
        block_row = np.repeat(np.arange(ip.size - 1), np.diff(ip))
        by_col = np.lexsort((block_row, ix))  # block-columns in turn, block-rows increasing
        t_indptr = np.zeros(self.shape[1] // self.block + 1, np.int64)
        np.add.at(t_indptr, ix + 1, 1)
        self.indptr = xp.asarray(ip.astype(np.int32))
        self.indices = xp.asarray(ix.astype(np.int32))
        self.block_row = xp.asarray(block_row.astype(np.int32))
        self.t_indptr = xp.asarray(np.cumsum(t_indptr).astype(np.int32))
        self.t_row = xp.asarray(block_row[by_col].astype(np.int32))
        self.t_block = xp.asarray(by_col.astype(np.int32))
        self.nnzb = int(ix.size)


def _check_bsr_pattern(shape: tuple[int, int], b: int, ip: np.ndarray, ix: np.ndarray) -> None:
    """What keeps every index of the BSR kernels in bounds: the kernels read
    ``indptr[o / b + 1]``, ``x[row, indices[blk] * b + j]`` and ``data[blk]`` unchecked."""
    rows, cols = shape
    if b < 1 or rows < 0 or cols < 0 or rows % b or cols % b:
        raise ValueError(f"shape {shape} must be non-negative multiples of the block {b}")
    int32_count(max(rows, cols), f"the larger dimension of {shape}")  # o and c are ints
    if ip.size != rows // b + 1 or ip[0] != 0 or np.any(np.diff(ip) < 0):
        raise ValueError(f"indptr must be {rows // b + 1} non-decreasing offsets from 0")
    if ip[-1] != ix.size:
        raise ValueError(f"indptr ends at {ip[-1]}, indices has {ix.size} entries")
    if ix.size and (ix.min() < 0 or ix.max() >= cols // b):
        raise ValueError(f"indices must be block-columns in [0, {cols // b})")


def bsr_linear(x: Any, w: BsrDevice, data: Any, bias: Any = None, backend: Any = None) -> Any:
    """``y = x @ W.T (+ bias)`` for ``x [M, in]``; ``data [nnzb, B, B]`` float32."""
    be = resolve_backend(backend)
    out_f, in_f = w.shape
    x = check_array(be, x, "x", np.float32, 2)
    data = check_array(be, data, "data", np.float32, 3)
    if x.shape[1] != in_f or data.shape != (w.nnzb, w.block, w.block):
        raise ValueError(f"x must be (M, {in_f}) and data ({w.nnzb}, {w.block}, {w.block})")
    if bias is not None:
        bias = check_array(be, bias, "bias", np.float32, 1)
        if bias.shape != (out_f,):
            raise ValueError(f"bias: expected shape ({out_f},), got {bias.shape}")
    m = int(x.shape[0])
    int32_count(m * out_f, f"M * out_features = {m} * {out_f}")
    y = be.xp.empty((m, out_f), np.float32)
    if m * out_f:
        be.launch(
            "bsr",
            "bsr_forward",
            (launch_grid(m * out_f),),
            (THREADS,),
            x,
            i32(m * out_f),
            i32(in_f),
            i32(out_f),
            i32(w.block),
            w.indptr,
            w.indices,
            data,
            bias,
            y,
        )
    return y


def bsr_linear_dx(dy: Any, w: BsrDevice, data: Any, backend: Any = None) -> Any:
    """``dx = dy @ W`` for ``dy [M, out]``."""
    be = resolve_backend(backend)
    out_f, in_f = w.shape
    dy = check_array(be, dy, "dy", np.float32, 2)
    data = check_array(be, data, "data", np.float32, 3)
    if dy.shape[1] != out_f or data.shape != (w.nnzb, w.block, w.block):
        raise ValueError(f"dy must be (M, {out_f}) and data ({w.nnzb}, {w.block}, {w.block})")
    m = int(dy.shape[0])
    int32_count(m * in_f, f"M * in_features = {m} * {in_f}")
    dx = be.xp.empty((m, in_f), np.float32)
    if m * in_f:
        be.launch(
            "bsr",
            "bsr_dx",
            (launch_grid(m * in_f),),
            (THREADS,),
            dy,
            i32(m * in_f),
            i32(out_f),
            i32(in_f),
            i32(w.block),
            w.t_indptr,
            w.t_row,
            w.t_block,
            data,
            dx,
        )
    return dx


def bsr_linear_dw(dy: Any, x: Any, w: BsrDevice, backend: Any = None) -> Any:
    """``dW`` at the kept blocks only (SDDMM): ``[nnzb, B, B]``."""
    be = resolve_backend(backend)
    out_f, in_f = w.shape
    dy = check_array(be, dy, "dy", np.float32, 2)
    x = check_array(be, x, "x", np.float32, 2)
    if dy.shape[1] != out_f or x.shape[1] != in_f or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy must be (M, {out_f}) and x (M, {in_f}); got {dy.shape}, {x.shape}")
    b = w.block
    n = int32_count(w.nnzb * b * b, f"nnzb * B * B = {w.nnzb} * {b} * {b}")
    dw = be.xp.empty((w.nnzb, b, b), np.float32)
    if n:
        be.launch(
            "bsr",
            "bsr_sddmm",
            (launch_grid(n),),
            (THREADS,),
            dy,
            x,
            i32(n),
            i32(int(dy.shape[0])),
            i32(out_f),
            i32(in_f),
            i32(b),
            w.block_row,
            w.indices,
            dw,
        )
    return dw
