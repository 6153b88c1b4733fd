"""FP8 quantization with fine-grained scales: the host code of ``cuda/fp8.cu``.

The GPU counterpart of :mod:`moecore.kernels.fp8` (DeepSeek-V3's 1 × 128 activation tiles
and 128 × 128 weight blocks, e4m3 values as ``uint8`` bytes, float32 scales), bit-identical
to it: the same bytes and scales (``tests/test_gpu_emu.py``). Compiled for sm_90 by
``moecore check-cuda`` like every family.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.kernels.cuda.launch import Backend, check_array, i32, resolve_backend

#: Tile and block edge; also the kernels' block size.
TILE = 128


def _tiles(n: int) -> int:
    return -(-n // TILE)


def quantize_tiles(x: Any, backend: Backend | None = None) -> tuple[Any, Any]:
    """``(q, scale)`` of a float32 ``[rows, cols]`` array: ``q`` the e4m3 bytes (``uint8``),
    ``scale`` ``[rows, ceil(cols/128)]``, one per 1 × 128 tile."""
    be = resolve_backend(backend)
    x = check_array(be, x, "x", np.float32, ndim=2)
    rows, cols = x.shape
    q = be.xp.empty((rows, cols), np.uint8)
    scale = be.xp.empty((rows, _tiles(cols)), np.float32)
    if x.size:
        be.launch(
            "fp8", "fp8_quantize_tiles", (_tiles(cols), rows), (TILE,), x, q, scale,
            i32(rows), i32(cols),
        )  # fmt: skip
    return q, scale


def quantize_blocks(w: Any, backend: Backend | None = None) -> tuple[Any, Any]:
    """``(q, scale)`` of a float32 ``[rows, cols]`` weight: e4m3 bytes and
    ``[ceil(rows/128), ceil(cols/128)]`` scales, one per 128 × 128 block."""
    be = resolve_backend(backend)
    w = check_array(be, w, "w", np.float32, ndim=2)
    rows, cols = w.shape
    q = be.xp.empty((rows, cols), np.uint8)
    scale = be.xp.empty((_tiles(rows), _tiles(cols)), np.float32)
    if w.size:
        be.launch(
            "fp8", "fp8_quantize_blocks", (_tiles(cols), _tiles(rows)), (TILE,), w, q, scale,
            i32(rows), i32(cols),
        )  # fmt: skip
    return q, scale


def dequantize(q: Any, scale: Any, blocks: bool, backend: Backend | None = None) -> Any:
    """float32 ``q · scale`` of :func:`quantize_tiles` (``blocks=False``) or
    :func:`quantize_blocks` (``blocks=True``)."""
    be = resolve_backend(backend)
    q = check_array(be, q, "q", np.uint8, ndim=2)
    scale = check_array(be, scale, "scale", np.float32, ndim=2)
    rows, cols = q.shape
    want = (_tiles(rows) if blocks else rows, _tiles(cols))
    if scale.shape != want:
        raise ValueError(
            f"scale: expected shape {want} for q of shape {q.shape}, got {scale.shape}"
        )
    out = be.xp.empty((rows, cols), np.float32)
    if q.size:
        be.launch(
            "fp8", "fp8_dequantize", (_tiles(cols), rows), (TILE,), q, scale, out,
            i32(rows), i32(cols), i32(TILE if blocks else 1),
        )  # fmt: skip
    return out
