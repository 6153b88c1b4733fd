"""``BsrMatrix``: its constructors, conversions (dense, scipy round trip) and the validation
of every rule at construction and in the kernels, each error naming what failed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from moecore import _core
from moecore.sparse import BsrMatrix, bsr_linear, bsr_linear_dw, bsr_linear_dx


def blocks(nnzb: int, b: int = 8) -> np.ndarray:
    return np.ones((nnzb, b, b), dtype=np.float32)


# ---- constructors and conversions ------------------------------------------------------------


def test_from_dense_keeps_nonzero_blocks_and_round_trips():
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((48, 32)).astype(np.float32)
    dense[16:32, :] = 0  # block-row 1 empty
    dense[:, 8:16] = 0  # block-column 1 empty
    w = BsrMatrix.from_dense(dense, 8)
    assert w.nnzb == (6 - 2) * (4 - 1)
    assert np.array_equal(w.to_dense(), dense)
    assert np.all(np.diff(w.indptr) >= 0) and w.indptr[0] == 0


def test_from_dense_with_mask_keeps_exactly_the_mask():
    dense = np.arange(16 * 16, dtype=np.float32).reshape(16, 16)
    mask = np.array([[True, False], [False, False]])
    w = BsrMatrix.from_dense(dense, 8, mask=mask)
    want = np.zeros_like(dense)
    want[:8, :8] = dense[:8, :8]
    assert w.nnzb == 1 and np.array_equal(w.to_dense(), want)
    zero = BsrMatrix.from_dense(np.zeros((16, 16)), 8, mask=np.ones((2, 2), bool))
    assert zero.nnzb == 4  # structural zeros are kept when the mask says so
    with pytest.raises(ValueError, match=r"mask: expected shape .*\(2, 2\)"):
        BsrMatrix.from_dense(dense, 8, mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="mask: expected dtype bool"):
        BsrMatrix.from_dense(dense, 8, mask=np.ones((2, 2)))


def test_random_is_reproducible_and_has_the_requested_density():
    a = BsrMatrix.random((512, 256), 32, density=0.25, seed=3)
    b = BsrMatrix.random((512, 256), 32, density=0.25, seed=3)
    assert a.nnzb == round(0.25 * 16 * 8) and a.density == pytest.approx(0.25)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.data, b.data)
    assert not np.array_equal(a.data, BsrMatrix.random((512, 256), 32, 0.25, seed=4).data)
    # Fan-in scaling: std ≈ 1/sqrt(density · in_features).
    assert a.data.std() == pytest.approx(1 / np.sqrt(0.25 * 256), rel=0.1)
    with pytest.raises(ValueError, match=r"density: expected a number in \[0, 1\]"):
        BsrMatrix.random((32, 32), 16, density=1.5)


def test_scipy_round_trip():
    w = BsrMatrix.random((96, 64), 32, density=0.5, seed=5)
    s = w.to_scipy()
    assert s.format == "bsr" and s.blocksize == (32, 32)
    assert np.array_equal(s.toarray(), w.to_dense())
    back = BsrMatrix.from_scipy(s)
    assert np.array_equal(back.indptr, w.indptr) and np.array_equal(back.indices, w.indices)
    assert np.array_equal(back.data, w.data)


def test_from_scipy_sums_duplicates_and_sorts_without_touching_the_input():
    data = np.stack([np.full((8, 8), v, np.float32) for v in (1.0, 2.0, 3.0)])
    # Block-row 0 holds column 1, then column 0 twice: unsorted and duplicated.
    s = sp.bsr_matrix((data, np.array([1, 0, 0]), np.array([0, 3])), shape=(8, 16))
    w = BsrMatrix.from_scipy(s)
    assert list(w.indices) == [0, 1]
    assert np.array_equal(w.to_dense(), s.toarray())
    assert list(s.indices) == [1, 0, 0]  # the caller's matrix is unchanged


def test_from_scipy_rejects_other_formats_and_blocks():
    with pytest.raises(ValueError, match=r"expected a scipy.sparse BSR .* got csr"):
        BsrMatrix.from_scipy(sp.csr_matrix(np.eye(16)))
    with pytest.raises(ValueError, match="expected square blocks"):
        BsrMatrix.from_scipy(sp.bsr_matrix(np.eye(16), blocksize=(8, 16)))
    with pytest.raises(ValueError, match="block: expected one of"):
        BsrMatrix.from_scipy(sp.bsr_matrix(np.eye(12), blocksize=(4, 4)))


# ---- validation at construction -------------------------------------------------------------


@pytest.mark.parametrize(
    ("indptr", "indices", "message"),
    [
        ([0, 2, 2], [1, 0], r"indices: not sorted within block-row 0"),
        ([0, 1, 3], [0, 1, 1], r"indices: duplicate block \(block-row 1, block-column 1\)"),
        ([0, 1, 1], [2], r"block-column index 2 .* out of range \[0, 2\)"),
        ([0, 1, 1], [-1], r"block-column index -1 .* out of range"),
        ([0, 1], [0], r"indptr: expected length 3 \(block-rows \+ 1\), got 2"),
        ([1, 1, 1], [0], r"indptr\[0\] must be 0, got 1"),
        ([0, 2, 1], [0], r"non-decreasing"),
        ([0, 1, 1], [0, 1], r"indptr\[-1\] = 1 must equal len\(indices\) = 2"),
    ],
)
def test_each_structural_rule_names_itself(indptr, indices, message):
    with pytest.raises(ValueError, match=message):
        BsrMatrix((16, 16), 8, indptr, indices, blocks(len(indices)))


def test_shape_and_block_rules():
    with pytest.raises(ValueError, match=r"out_features = 20 is not a multiple of block = 8"):
        BsrMatrix((20, 16), 8, [0, 0, 0], [], blocks(0))
    with pytest.raises(ValueError, match=r"in_features = 12 is not a multiple of block = 8"):
        BsrMatrix((16, 12), 8, [0, 0, 0], [], blocks(0))
    with pytest.raises(ValueError, match=r"block: expected one of \(8, 16, 32, 64\), got 4"):
        BsrMatrix((16, 16), 4, [0, 0, 0, 0, 0], [], blocks(0, 4))
    with pytest.raises(ValueError, match="shape: expected"):
        BsrMatrix((16,), 8, [0, 0, 0], [], blocks(0))
    with pytest.raises(ValueError, match="indices: expected an integer dtype, got float64"):
        BsrMatrix((16, 16), 8, [0, 1, 1], np.array([0.0]), blocks(1))


def test_data_rules():
    with pytest.raises(ValueError, match=r"data: expected shape .* \(1, 8, 8\), got \(1, 8, 16\)"):
        BsrMatrix((16, 16), 8, [0, 1, 1], [0], np.ones((1, 8, 16), np.float32))
    with pytest.raises(ValueError, match=r"data: expected shape .* \(2, 8, 8\), got \(1, 8, 8\)"):
        BsrMatrix((16, 16), 8, [0, 2, 2], [0, 1], blocks(1))
    with pytest.raises(ValueError, match="data: expected dtype float32, got float64"):
        BsrMatrix((16, 16), 8, [0, 1, 1], [0], np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match="data: expected a C-contiguous array"):
        BsrMatrix((16, 16), 8, [0, 1, 1], [0], np.ones((1, 8, 8), np.float32).transpose(0, 2, 1))
    with pytest.raises(ValueError, match=r"data: expected a numpy\.ndarray, got list"):
        BsrMatrix((16, 16), 8, [0, 1, 1], [0], [[[1.0] * 8] * 8])


def test_pattern_arrays_are_read_only_copies():
    indices = np.array([0], dtype=np.int32)
    w = BsrMatrix((16, 16), 8, np.array([0, 1, 1]), indices, blocks(1))
    indices[0] = 5  # changing the caller's array does not change the validated pattern
    assert w.indices[0] == 0 and w.indices.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        w.indices[0] = 1


# ---- validation in the kernels ----------------------------------------------------------------


@pytest.fixture
def w() -> BsrMatrix:
    return BsrMatrix.random((64, 32), 16, density=0.5, seed=0)


def test_kernel_argument_errors(w):
    x = np.ones((4, 32), np.float32)
    dy = np.ones((4, 64), np.float32)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 32\) .* got \(4, 16\)"):
        bsr_linear(np.ones((4, 16), np.float32), w)
    with pytest.raises(ValueError, match="x: expected dtype float32, got float64"):
        bsr_linear(np.ones((4, 32)), w)
    with pytest.raises(ValueError, match="x: expected a C-contiguous array"):
        bsr_linear(np.ones((32, 4), np.float32).T, w)
    with pytest.raises(ValueError, match=r"bias: expected shape \(64,\) .* got \(32,\)"):
        bsr_linear(x, w, np.ones(32, np.float32))
    with pytest.raises(ValueError, match="bias: expected dtype float32, got int64"):
        bsr_linear(x, w, np.ones(64, np.int64))
    with pytest.raises(ValueError, match=r"dy: expected shape \(\.\.\., 64\) .* got \(4, 32\)"):
        bsr_linear_dx(x, w)
    with pytest.raises(ValueError, match="dy: expected a C-contiguous array"):
        bsr_linear_dx(np.ones((4, 128), np.float32)[:, ::2], w)
    with pytest.raises(ValueError, match=r"x: expected the leading shape of dy \(4,\), got \(3,\)"):
        bsr_linear_dw(dy, np.ones((3, 32), np.float32), w)
    with pytest.raises(ValueError, match=r"w: expected a moecore\.sparse\.BsrMatrix"):
        bsr_linear(x, w.to_dense())


def test_core_functions_validate_on_their_own(w):
    # The extension checks its arguments itself, whoever calls it.
    x = np.ones((4, 32), np.float32)
    with pytest.raises(ValueError, match="x: expected dtype float32, got float64"):
        _core.bsr_linear(np.ones((4, 32)), w._pattern, w.data)
    with pytest.raises(ValueError, match="x: expected a 2-D array"):
        _core.bsr_linear(np.ones(32, np.float32), w._pattern, w.data)
    with pytest.raises(ValueError, match="x: expected a C-contiguous array"):
        _core.bsr_linear(np.ones((32, 4), np.float32).T, w._pattern, w.data)
    with pytest.raises(ValueError, match=r"data: expected shape .* got \(3, 16, 16\)"):
        _core.bsr_linear(x, w._pattern, np.ones((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"x: expected a numpy\.ndarray, got list"):
        _core.bsr_linear([[1.0] * 32], w._pattern, w.data)
    with pytest.raises(ValueError, match=r"x: expected 4 rows \(as many as dy\), got 2"):
        _core.bsr_linear_dw(np.ones((4, 64), np.float32), np.ones((2, 32), np.float32), w._pattern)
    with pytest.raises(ValueError, match="indices: expected dtype int64, got int32"):
        _core.BsrPattern((16, 16), 8, np.array([0, 1, 1]), np.array([0], np.int32))
    with pytest.raises(ValueError, match="not sorted"):
        _core.BsrPattern((16, 16), 8, np.array([0, 2, 2]), np.array([1, 0]))
    assert repr(w._pattern) == f"BsrPattern(shape=(64, 32), block=16, nnzb={w.nnzb})"
