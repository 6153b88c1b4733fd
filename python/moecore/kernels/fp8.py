"""FP8 GEMM with fine-grained scaling, DeepSeek-V3's recipe (§3.3), emulated exactly on the
CPU through ``ml_dtypes.float8_e4m3fn``.

- Activations ``[M, K]`` are quantized per **1 × 128 tile** (one token, 128 channels),
  weights ``[N, K]`` per **128 × 128 block**; each tile's or block's scale is its
  ``amax / 448`` (448 is e4m3's largest finite value), computed online from the data, as
  DeepGEMM's ``per_token_cast_to_fp8`` / ``per_block_cast_to_fp8`` do.
- :func:`fp8_gemm` multiplies the e4m3 operands in chunks of 128 along K: each chunk's
  products are summed in float32 (the "tensor core" part), then **promoted**: scaled by the
  chunk's activation and weight scales and added to a float32 accumulator (the "CUDA core"
  part, N_C = 128 in the report). Products of two e4m3 values are exact in float32, so the
  only roundings are the float32 sums, which is what the recipe's promotion achieves on
  hardware.

A partial tile or block (K or N not a multiple of 128) has its own scale over the elements
it has. An all-zero tile gets scale 1 (its values are zeros whatever the scale).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from moecore.errors import NonFiniteInput

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
#: The largest finite e4m3 value: a tile's amax maps onto it.
E4M3_MAX = float(ml_dtypes.finfo(E4M3).max)
#: Tile and block edge, and the promotion interval along K.
TILE = 128


def _check_2d(name: str, a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a float array, got {a.dtype}")
    return a


def _scales(amax: np.ndarray) -> np.ndarray:
    scale = (amax / E4M3_MAX).astype(np.float32)
    scale[scale == 0] = 1.0
    if not np.all(np.isfinite(scale)):
        raise NonFiniteInput("fp8 quantization of a non-finite value")
    return scale


def _tile_amax(x: np.ndarray, axis_len: int) -> tuple[np.ndarray, int]:
    """``|x|``'s max over each run of 128 along the last axis: ``[..., ceil(K/128)]``."""
    n_tiles = -(-axis_len // TILE)
    pad = n_tiles * TILE - axis_len
    a = np.abs(x.astype(np.float32))
    if pad:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], pad), np.float32)], axis=-1)
    return a.reshape(*a.shape[:-1], n_tiles, TILE).max(axis=-1), n_tiles


def _expand(scale: np.ndarray, length: int, axis: int) -> np.ndarray:
    return np.repeat(scale, TILE, axis=axis).take(np.arange(length), axis=axis)


def quantize_activation(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale)``: ``x`` ``[M, K]`` as e4m3 values ``q`` with one float32 scale per 1 × 128
    tile, ``scale`` ``[M, ceil(K/128)]``, so that ``q · scale ≈ x``."""
    x = _check_2d("x", x)
    amax, _ = _tile_amax(x, x.shape[1])
    scale = _scales(amax)
    q = (x.astype(np.float32) / _expand(scale, x.shape[1], 1)).astype(E4M3)
    return q, scale


def quantize_weight(w: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale)``: ``w`` ``[N, K]`` as e4m3 values with one float32 scale per 128 × 128
    block, ``scale`` ``[ceil(N/128), ceil(K/128)]``."""
    w = _check_2d("w", w)
    n, k = w.shape
    row_amax, _ = _tile_amax(w, k)  # [N, kt]: per row, per 128 columns
    nt = -(-n // TILE)
    pad = nt * TILE - n
    if pad:
        row_amax = np.concatenate([row_amax, np.zeros((pad, row_amax.shape[1]), np.float32)])
    scale = _scales(row_amax.reshape(nt, TILE, -1).max(axis=1))
    full = _expand(_expand(scale, n, 0), k, 1)
    return (w.astype(np.float32) / full).astype(E4M3), scale


def dequantize_activation(q: Any, scale: Any) -> np.ndarray:
    """float32 ``q · scale`` of :func:`quantize_activation`'s result."""
    return q.astype(np.float32) * _expand(np.asarray(scale, np.float32), q.shape[1], 1)


def dequantize_weight(q: Any, scale: Any) -> np.ndarray:
    """float32 ``q · scale`` of :func:`quantize_weight`'s result."""
    n, k = q.shape
    return q.astype(np.float32) * _expand(_expand(np.asarray(scale, np.float32), n, 0), k, 1)


def fp8_gemm(xq: Any, x_scale: Any, wq: Any, w_scale: Any) -> np.ndarray:
    """``x @ w.T`` from the e4m3 operands and scales of :func:`quantize_activation` and
    :func:`quantize_weight`: ``[M, K]``, ``[N, K]`` → float32 ``[M, N]``, summed in float32
    per 128 products along K and promoted (scaled, added to a float32 accumulator) after
    each 128."""
    m, k = xq.shape
    n, k2 = wq.shape
    if k != k2:
        raise ValueError(f"fp8_gemm: x has K = {k}, w has K = {k2}")
    if xq.dtype != E4M3 or wq.dtype != E4M3:
        raise TypeError(f"fp8_gemm takes float8_e4m3fn operands, got {xq.dtype} and {wq.dtype}")
    out = np.zeros((m, n), np.float32)
    w_rows = _expand(np.asarray(w_scale, np.float32), n, 0)  # [N, kt]
    for c, start in enumerate(range(0, k, TILE)):
        cols = slice(start, min(start + TILE, k))
        part = xq[:, cols].astype(np.float32) @ wq[:, cols].astype(np.float32).T
        out += part * (x_scale[:, c : c + 1] * w_rows[None, :, c])
    return out


def fake_quantize_activation(x: Any) -> np.ndarray:
    """``x`` ``[..., K]`` through 1 × 128-tile e4m3 and back (float32): what an fp8 GEMM sees
    of it. An ``x`` holding inf or NaN is returned as it is (as float32), so a diverging
    step reaches the loss and is skipped rather than stopping the run here."""
    x = np.asarray(x)
    x2 = x.reshape(-1, x.shape[-1])
    try:
        return dequantize_activation(*quantize_activation(x2)).reshape(x.shape)
    except NonFiniteInput:
        return x.astype(np.float32)  # passed through: the trainer sees the inf/NaN and skips


def fake_quantize_weight(w: Any) -> np.ndarray:
    """``w`` ``[N, K]`` (or ``[E, N, K]``, a block grid per leading index) through
    128 × 128-block e4m3 and back (float32)."""
    w = np.asarray(w)
    try:
        if w.ndim == 2:
            return dequantize_weight(*quantize_weight(w))
        flat = w.reshape(-1, *w.shape[-2:])
        return np.stack([dequantize_weight(*quantize_weight(m)) for m in flat]).reshape(w.shape)
    except NonFiniteInput:
        return w.astype(np.float32)
