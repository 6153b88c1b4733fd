"""Top-k selection by magnitude and error feedback: the host code of ``cuda/topk.cu``."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.errors import NonFiniteGradient
from moecore.kernels.cuda.launch import (
    MAX_GRID,
    THREADS,
    Backend,
    check_array,
    i32,
    launch_grid,
    resolve_backend,
)

_NONFINITE_DIGIT = 0x7F800000 >> 20  # first-pass digits at or above it hold NaN / ±inf


def topk_select(
    x: Any, k: int, backend: Backend | None = None, method: str = "exact"
) -> tuple[Any, Any]:
    """The k entries of float32 ``x`` (any shape, read flat) with the largest magnitude.

    Returns ``(idx, values)``: int32 indices, increasing, ties to the lower index, and the
    float32 values there. ``ValueError`` on NaN/±inf (naming the first index) or a bad k.

    ``method="exact"``: three radix-histogram passes over ``x`` find the k-th largest key,
    one compaction pass writes the result. ``"sampled"`` (Deep Gradient Compression): a
    threshold from a strided sample, one counting pass (lowered ×0.8 up to 10 times while
    fewer than k pass), one compaction of the candidates at or above it, then the exact
    method on the candidates only; the result is identical to ``"exact"`` (it falls back to
    it when the threshold cannot be corrected).
    """
    be = resolve_backend(backend)
    x = check_array(be, x, "x", np.float32).reshape(-1)
    n = int(x.size)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n = {n}], got {k}")
    if method not in ("exact", "sampled"):
        raise ValueError(f'method must be "exact" or "sampled", got {method!r}')
    if method == "sampled" and 0 < k < n:
        picked = _sampled_select(be, x, k)
        if picked is not None:
            return picked
    return _exact_select(be, x, k)


_SAMPLE_MIN = 1024
_MAX_ROUNDS = 10


def _sampled_select(be: Backend, x: Any, k: int) -> tuple[Any, Any] | None:
    """The sampled method, or None when its threshold cannot be corrected in time."""
    xp = be.xp
    n = int(x.size)
    stride = max(1, n // max(_SAMPLE_MIN, n // 100))
    sample = be.to_host(xp.abs(x[::stride]))
    kk = min(sample.size, max(1, -(-k * sample.size // n)))
    threshold = np.float32(np.partition(sample, sample.size - kk)[sample.size - kk]) * np.float32(
        0.9
    )
    count = xp.zeros(1, np.uint32)
    for _ in range(_MAX_ROUNDS):
        key = int(np.float32(threshold).view(np.uint32)) & 0x7FFFFFFF
        if key == 0 or not np.isfinite(threshold):
            return None  # everything passes (or the sample held NaN/inf): exact method
        count.fill(0)
        be.launch(
            "topk",
            "topk_count_at_least",
            (min(launch_grid(n), MAX_GRID),),
            (THREADS,),
            x,
            i32(n),
            np.uint32(key),
            count,
        )
        passed = int(be.to_host(count)[0])
        if passed >= k:
            break
        threshold = np.float32(threshold * np.float32(0.8))
    else:
        return None
    # Candidates: every key >= threshold (keys > threshold - 1, no ties), in index order.
    cand_idx, cand_val = _compact(be, x, key - 1, 0, passed)
    try:
        pos, val = _exact_select(be, cand_val, k)
    except ValueError:
        _raise_if_nonfinite(be, x)  # name the index in x, not among the candidates
        raise
    return cand_idx[pos], val


def _exact_select(be: Backend, x: Any, k: int) -> tuple[Any, Any]:
    xp = be.xp
    n = int(x.size)
    if n == 0 or k == 0:
        _raise_if_nonfinite(be, x)
        return xp.zeros(0, np.int32), xp.zeros(0, np.float32)
    hist = xp.zeros(2048, np.uint32)
    prefix, mask, remaining = 0, 0, k
    grid = (min(launch_grid(n), MAX_GRID),)
    for shift in (20, 9, 0):
        hist.fill(0)
        be.launch(
            "topk",
            "topk_radix_histogram",
            grid,
            (THREADS,),
            x,
            i32(n),
            np.uint32(prefix),
            np.uint32(mask),
            i32(shift),
            hist,
        )
        h = be.to_host(hist).astype(np.int64)
        if shift == 20 and h[_NONFINITE_DIGIT:].any():
            _raise_if_nonfinite(be, x)
        from_top = np.cumsum(h[::-1])
        j = int(np.searchsorted(from_top, remaining))  # first digit (from the top) reaching k
        digit = 2047 - j
        remaining -= int(from_top[j] - h[digit])
        prefix |= digit << shift
        mask |= 2047 << shift
    kth_key, ties = prefix, remaining  # take the first `ties` entries whose key equals kth_key
    return _compact(be, x, kth_key, ties, k)


def _compact(be: Backend, x: Any, kth_key: int, ties: int, k: int) -> tuple[Any, Any]:
    """The k entries with key > kth_key or (key == kth_key and among the first `ties` such),
    in increasing index order: tile counts, exclusive scans, compaction."""
    xp = be.xp
    n = int(x.size)
    tiles = launch_grid(n)
    gt = xp.zeros(tiles, np.uint32)
    eq = xp.zeros(tiles, np.uint32)
    be.launch(
        "topk", "topk_tile_counts", (tiles,), (THREADS,), x, i32(n), np.uint32(kth_key), gt, eq
    )
    gt_before = _exclusive_cumsum(xp, gt)
    eq_before = _exclusive_cumsum(xp, eq)
    idx = xp.empty(k, np.int32)
    val = xp.empty(k, np.float32)
    be.launch(
        "topk",
        "topk_compact",
        (tiles,),
        (THREADS,),
        x,
        i32(n),
        np.uint32(kth_key),
        np.uint32(ties),
        gt_before,
        eq_before,
        idx,
        val,
    )
    return idx, val


def _exclusive_cumsum(xp: Any, a: Any) -> Any:
    out = xp.zeros(a.size, np.uint32)
    if a.size > 1:
        out[1:] = xp.cumsum(a[:-1], dtype=np.uint32)
    return out


def _raise_if_nonfinite(be: Backend, x: Any) -> None:
    bad = be.to_host(be.xp.nonzero(~be.xp.isfinite(x))[0])
    if bad.size:
        i = int(bad[0])
        raise NonFiniteGradient(f"gradient has a non-finite value {float(x[i])} at index {i}")


def topk_error_feedback(
    residual: Any, grad: Any, k: int, backend: Backend | None = None, method: str = "exact"
) -> tuple[Any, Any]:
    """Error-feedback top-k with f32 values: ``residual += grad``, select the top k of the
    residual, clear the sent entries. Returns ``(idx, values)``. A non-finite gradient raises
    ``ValueError`` before the residual is touched."""
    be = resolve_backend(backend)
    r = check_array(be, residual, "residual", np.float32).reshape(-1)
    g = check_array(be, grad, "grad", np.float32).reshape(-1)
    if r.size != g.size:
        raise ValueError(f"grad has {g.size} elements, the residual {r.size}")
    _raise_if_nonfinite(be, g)
    n = int(r.size)
    if n:
        be.launch("topk", "topk_residual_accumulate", (launch_grid(n),), (THREADS,), r, g, i32(n))
    idx, val = topk_select(r, k, be, method)
    if k:
        be.launch(
            "topk",
            "topk_residual_update",
            (launch_grid(k),),
            (THREADS,),
            r,
            i32(n),
            idx,
            val,
            i32(k),
        )
    return idx, val
