"""Property test: for arbitrary small shapes, block sizes, densities, row counts and values,
the three BSR kernels equal the dense numpy products on ``to_dense()`` within the float32
summation bound, and the scipy round trip is exact."""

from __future__ import annotations

import numpy as np
from _bsr_reference import assert_product_close, dense_dw
from hypothesis import given, settings
from hypothesis import strategies as st

from moecore.sparse import SUPPORTED_BLOCKS, BsrMatrix, bsr_linear, bsr_linear_dw, bsr_linear_dx


@settings(max_examples=40, deadline=None)
@given(
    block=st.sampled_from(SUPPORTED_BLOCKS),
    nbr=st.integers(0, 4),
    nbc=st.integers(0, 4),
    n=st.integers(0, 40),
    mask_bits=st.integers(0, 2**16 - 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_bsr_matches_dense(block, nbr, nbc, n, mask_bits, seed):
    bits = [(mask_bits >> k) & 1 for k in range(nbr * nbc)]
    mask = np.array(bits, dtype=bool).reshape(nbr, nbc)
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((nbr * block, nbc * block)).astype(np.float32)
    w = BsrMatrix.from_dense(dense, block, mask=mask)
    x = rng.standard_normal((n, nbc * block)).astype(np.float32)
    dy = rng.standard_normal((n, nbr * block)).astype(np.float32)
    bias = rng.standard_normal(nbr * block).astype(np.float32)
    d = w.to_dense()

    assert_product_close(bsr_linear(x, w, bias), x, d.T, nbc * block, extra=bias)
    assert_product_close(bsr_linear_dx(dy, w), dy, d, nbr * block)
    got = bsr_linear_dw(dy, x, w)
    want, bound = dense_dw(dy, x, w)
    assert np.all(np.abs(got - want) <= bound + 1e-30)

    back = BsrMatrix.from_scipy(w.to_scipy())
    assert np.array_equal(back.to_dense(), d)
