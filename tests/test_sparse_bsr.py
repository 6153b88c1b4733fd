"""The BSR kernels (forward, dX, dW) against dense numpy products on ``to_dense()``, on every
block size and on the edge shapes: no rows, one row, odd row counts, density 0 and 1, empty
block-rows and block-columns, leading batch dimensions. Tolerance: the float32 summation bound
``K·eps32·(|a| @ |b|)`` (see ``_bsr_reference``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _bsr_reference import assert_product_close, dense_dw, matrix_with_mask

from moecore.sparse import (
    SUPPORTED_BLOCKS,
    BsrMatrix,
    bsr_linear,
    bsr_linear_dw,
    bsr_linear_dx,
    kernel_isa,
)


def check_all_kernels(w: BsrMatrix, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    out_f, in_f = w.shape
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    dy = rng.standard_normal((n, out_f)).astype(np.float32)
    bias = rng.standard_normal(out_f).astype(np.float32)
    dense = w.to_dense()

    assert_product_close(bsr_linear(x, w), x, dense.T, in_f)
    assert_product_close(bsr_linear(x, w, bias), x, dense.T, in_f, extra=bias)
    assert_product_close(bsr_linear_dx(dy, w), dy, dense, out_f)
    got = bsr_linear_dw(dy, x, w)
    want, bound = dense_dw(dy, x, w)
    assert got.shape == (w.nnzb, w.block, w.block) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound + 1e-30)


@pytest.mark.parametrize("block", SUPPORTED_BLOCKS)
@pytest.mark.parametrize("n", [0, 1, 7, 33])
def test_every_block_size_and_row_count(block, n):
    w = BsrMatrix.random((2 * block, 3 * block), block, density=0.5, seed=block + n)
    check_all_kernels(w, n, seed=n)


@pytest.mark.parametrize("block", [8, 32])
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_density_zero_and_one(block, density):
    w = BsrMatrix.random((3 * block, 2 * block), block, density=density, seed=1)
    assert w.nnzb == round(density * 6)
    check_all_kernels(w, 13, seed=2)


def test_density_zero_gives_exact_zeros_and_the_bias():
    w = BsrMatrix.random((64, 32), 16, density=0.0, seed=0)
    x = np.ones((3, 32), dtype=np.float32)
    bias = np.arange(64, dtype=np.float32)
    assert np.array_equal(bsr_linear(x, w), np.zeros((3, 64), np.float32))
    assert np.array_equal(bsr_linear(x, w, bias), np.broadcast_to(bias, (3, 64)))
    assert np.array_equal(bsr_linear_dx(np.ones((3, 64), np.float32), w), np.zeros((3, 32)))
    assert bsr_linear_dw(np.ones((3, 64), np.float32), x, w).shape == (0, 16, 16)


def test_empty_block_rows_and_columns():
    # Block-rows 0 and 2 empty, block-column 1 empty.
    mask = np.array([[0, 0, 0], [1, 0, 1], [0, 0, 0], [1, 0, 0]], dtype=bool)
    w = matrix_with_mask(4 * 16, 3 * 16, 16, mask, seed=3)
    assert w.nnzb == 3 and list(w.indptr) == [0, 0, 2, 2, 3]
    check_all_kernels(w, 21, seed=4)


def test_empty_dense_dimensions():
    for shape in [(0, 64), (64, 0), (0, 0)]:
        w = BsrMatrix.random(shape, 32, density=1.0, seed=0)
        check_all_kernels(w, 5, seed=5)


def test_rows_not_a_multiple_of_any_tile_and_many_blocks_per_row():
    w = BsrMatrix.random((128, 512), 32, density=0.75, seed=6)
    check_all_kernels(w, 131, seed=7)


def test_deep_reduction_in_dw():
    # More rows than the kernel's row chunk and super-panel steps take at once.
    w = BsrMatrix.random((64, 64), 16, density=0.5, seed=8)
    check_all_kernels(w, 1000, seed=9)


@pytest.mark.parametrize("block", SUPPORTED_BLOCKS)
@pytest.mark.parametrize("n", [3, 64, 67, 130])
def test_dw_every_row_tile_of_the_block(block, n):
    # dW's AVX2 tiles split a block's rows unevenly (B = 32: four tiles of 6 rows, two of 4;
    # B = 16: 6, 6, 4; B = 64: ten of 6, one of 4) and unroll the reduction by 4: a wrong tile
    # origin, a row left out or the unrolled loop's remainder (n mod 4 != 0, across the 64-row
    # chunk) shows in some element of some block. Against float64 numpy, with rows wide enough
    # (16 block-columns) that the packed dy and x panels sit at many offsets.
    w = BsrMatrix.random((4 * block, 16 * block), block, density=0.4, seed=block * n)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, w.shape[1])).astype(np.float32)
    dy = rng.standard_normal((n, w.shape[0])).astype(np.float32)
    got = bsr_linear_dw(dy, x, w)
    want, bound = dense_dw(dy, x, w)
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= bound + 1e-30)


def test_leading_batch_dimensions():
    w = BsrMatrix.random((64, 96), 32, density=0.5, seed=10)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 64)).astype(np.float32)
    y = bsr_linear(x, w)
    assert y.shape == (2, 3, 64)
    assert_product_close(y.reshape(6, 64), x.reshape(6, 96), w.to_dense().T, 96)
    assert bsr_linear_dx(dy, w).shape == (2, 3, 96)
    got = bsr_linear_dw(dy, x, w)
    want, bound = dense_dw(dy.reshape(6, 64), x.reshape(6, 96), w)
    assert np.all(np.abs(got - want) <= bound + 1e-30)


def test_hand_computed_case():
    # 2x2 blocks of 8: W = [[I, 0], [0, 2I]] keeps blocks (0, 0) and (1, 1).
    dense = np.zeros((16, 16), dtype=np.float32)
    dense[:8, :8] = np.eye(8)
    dense[8:, 8:] = 2 * np.eye(8)
    w = BsrMatrix.from_dense(dense, 8)
    assert w.nnzb == 2
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    expected = x.copy()
    expected[:, 8:] *= 2
    assert np.array_equal(bsr_linear(x, w), expected)
    assert np.array_equal(bsr_linear_dx(x, w), expected)
    # dW for block (0, 0) = dy[:, :8].T @ x[:, :8]; with dy = x that is x0ᵀx0.
    dw = bsr_linear_dw(x, x, w)
    assert np.array_equal(dw[0], x[:, :8].T @ x[:, :8])
    assert np.array_equal(dw[1], x[:, 8:].T @ x[:, 8:])


def test_weights_are_read_in_place():
    w = BsrMatrix.random((32, 32), 16, density=1.0, seed=12)
    x = np.ones((2, 32), dtype=np.float32)
    before = bsr_linear(x, w)
    w.data *= 2  # an optimizer step updates the blocks in place
    assert np.allclose(bsr_linear(x, w), 2 * before, rtol=1e-6)


def test_outputs_are_fresh_writable_c_contiguous_arrays():
    w = BsrMatrix.random((64, 32), 32, density=1.0, seed=13)
    x = np.ones((3, 32), dtype=np.float32)
    for out in (bsr_linear(x, w), bsr_linear_dx(np.ones((3, 64), np.float32), w)):
        assert out.flags.c_contiguous and out.flags.writeable
        assert not np.shares_memory(out, x) and not np.shares_memory(out, w.data)


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_out_receives_the_result_bit_for_bit(lead):
    # out= holds NaN first, so a missed element shows; the result equals the fresh array's.
    w = BsrMatrix.random((64, 96), 32, density=0.5, seed=16)
    rng = np.random.default_rng(17)
    x = rng.standard_normal((*lead, 96)).astype(np.float32)
    dy = rng.standard_normal((*lead, 64)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    for fresh, call, shape in [
        (bsr_linear(x, w, bias), lambda o: bsr_linear(x, w, bias, out=o), (*lead, 64)),
        (bsr_linear_dx(dy, w), lambda o: bsr_linear_dx(dy, w, out=o), (*lead, 96)),
        (bsr_linear_dw(dy, x, w), lambda o: bsr_linear_dw(dy, x, w, out=o), w.data.shape),
    ]:
        out = np.full(shape, np.nan, dtype=np.float32)
        assert call(out) is out
        assert np.array_equal(out, fresh)
        out[...] = 7.0  # overwritten, not accumulated into
        call(out)
        assert np.array_equal(out, fresh)


def test_bad_out_is_refused_naming_the_problem():
    w = BsrMatrix.random((64, 96), 32, density=0.5, seed=18)
    x = np.ones((4, 96), dtype=np.float32)
    good = np.empty((4, 64), dtype=np.float32)
    cases = [
        (np.empty((4, 64), dtype=np.float64), "dtype float32"),
        (np.empty((64, 4), dtype=np.float32), r"shape \(4, 64\)"),
        (np.empty((2, 2, 64), dtype=np.float32), r"shape \(4, 64\)"),  # same size, wrong shape
        (np.empty((4, 128), dtype=np.float32)[:, ::2], "C-contiguous"),
        ([[0.0] * 64] * 4, "numpy.ndarray"),
    ]
    readonly = good.copy()
    readonly.flags.writeable = False
    cases.append((readonly, "read-only"))
    for out, message in cases:
        with pytest.raises(ValueError, match=message):
            bsr_linear(x, w, out=out)
    # out sharing memory with the input (an in-place product would read what it overwrote).
    square = BsrMatrix.random((96, 96), 32, density=0.5, seed=19)
    x2 = np.ones((4, 96), dtype=np.float32)
    with pytest.raises(ValueError, match="shares memory"):
        bsr_linear(x2, square, out=x2)
    with pytest.raises(ValueError, match="shares memory"):
        bsr_linear_dx(x2, square, out=x2)
    assert np.all(x2 == 1.0)
    buffer = np.ones(square.data.size + 384, dtype=np.float32)
    dy = buffer[:384].reshape(4, 96)
    with pytest.raises(ValueError, match="shares memory"):
        bsr_linear_dw(dy, x2, square, out=buffer[: square.data.size].reshape(square.data.shape))
    assert np.all(buffer == 1.0)


def test_concurrent_calls_from_threads_are_correct():
    # The GIL is released during the kernels; calls from several threads must not interfere.
    w = BsrMatrix.random((128, 256), 32, density=0.5, seed=14)
    rng = np.random.default_rng(15)
    xs = [rng.standard_normal((40, 256)).astype(np.float32) for _ in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        ys = list(pool.map(lambda x: bsr_linear(x, w), xs))
    for x, y in zip(xs, ys, strict=True):
        assert_product_close(y, x, w.to_dense().T, 256)


def test_kernel_isa_names_a_known_instruction_set():
    assert kernel_isa() in {"avx512", "avx2", "scalar"}
