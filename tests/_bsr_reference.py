"""Dense numpy references and a rigorous float32 tolerance for the BSR kernel tests."""

from __future__ import annotations

import numpy as np

from moecore.sparse import BsrMatrix

EPS32 = float(np.finfo(np.float32).eps)


def assert_product_close(got, a, b, depth_axis_len: int, extra=None) -> None:
    """``got`` (float32) equals ``a @ b`` (+ ``extra``) computed in float64, within the
    classic bound for a float32 sum of ``K`` products: ``|err| <= K·eps32·(|a| @ |b|)``
    (plus one rounding of the bias), which any wrong block, index or row breaks by orders of
    magnitude."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = a64 @ b64
    bound = max(depth_axis_len, 1) * EPS32 * (np.abs(a64) @ np.abs(b64))
    if extra is not None:
        want = want + extra.astype(np.float64)
        bound = bound + EPS32 * np.abs(want)
    assert got.dtype == np.float32
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got.astype(np.float64) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
    assert np.all(err <= bound + 1e-30), (
        f"max excess at {worst}: got {got[worst]}, want {want[worst]}, bound {bound[worst]}"
    )


def dense_dw(dy: np.ndarray, x: np.ndarray, w: BsrMatrix) -> tuple[np.ndarray, np.ndarray]:
    """The full dense gradient ``dy.T @ x`` read off at the kept blocks, with its bound."""
    b = w.block
    dy64, x64 = dy.astype(np.float64), x.astype(np.float64)
    full = dy64.T @ x64
    mag = np.abs(dy64).T @ np.abs(x64)
    rows = np.repeat(np.arange(w.shape[0] // b), np.diff(w.indptr))
    out = np.empty((w.nnzb, b, b))
    out_bound = np.empty((w.nnzb, b, b))
    for k, (i, j) in enumerate(zip(rows, w.indices, strict=True)):
        out[k] = full[i * b : (i + 1) * b, j * b : (j + 1) * b]
        out_bound[k] = mag[i * b : (i + 1) * b, j * b : (j + 1) * b]
    return out, max(dy.shape[0], 1) * EPS32 * out_bound


def matrix_with_mask(rows: int, cols: int, block: int, mask: np.ndarray, seed: int) -> BsrMatrix:
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((rows, cols)).astype(np.float32)
    return BsrMatrix.from_dense(dense, block, mask=mask)
