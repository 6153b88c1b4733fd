"""torch CPU tensors through every runtime face: viewed in place (no copy), the numpy results,
and refusals naming the argument for what would need a copy."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch integration tests need PyTorch")

from moecore import moe_kernels as mk  # noqa: E402
from moecore.compress import TopK  # noqa: E402
from moecore.pool import HostPool  # noqa: E402
from moecore.sparse import BsrMatrix, bsr_linear  # noqa: E402


def test_moe_kernels_take_torch_tensors_in_place():
    logits = torch.randn(16, 8)
    idx, weights, probs = mk.route(logits, 2)
    ref = mk.route(logits.numpy(), 2)
    for got, want in zip((idx, weights, probs), ref):
        np.testing.assert_array_equal(got, want)
    d_x = torch.zeros(16, 4)
    router = torch.randn(8, 4)
    mk.router_backward(torch.ones(16, 8), torch.randn(16, 4), router, d_x)  # writes d_x
    torch.testing.assert_close(d_x, torch.ones(16, 8) @ router)


@pytest.mark.parametrize(
    ("logits", "error", "pattern"),
    [
        (lambda: torch.randn(8, 16).T, ValueError, r"logits: expected a C-contiguous array"),
        (lambda: torch.randn(16, 8, dtype=torch.float64), ValueError, r"logits: .*float64"),
        (lambda: torch.randn(16, 8, dtype=torch.bfloat16), TypeError, r"logits: could not view"),
        (lambda: torch.randn(16, 8, requires_grad=True), TypeError, r"logits: .*\.detach\(\)"),
    ],
)
def test_moe_kernels_refuse_what_needs_a_copy(logits, error, pattern):
    with pytest.raises(error, match=pattern):
        mk.route(logits(), 2)


def test_sparse_and_compress_take_torch_tensors():
    w = BsrMatrix.random((32, 64), block=16, density=0.5, seed=0)
    x = torch.randn(4, 64)
    out = torch.empty(4, 32)
    assert bsr_linear(x, w, out=out) is out
    torch.testing.assert_close(out, x @ torch.from_numpy(w.to_dense()).T, rtol=1e-5, atol=1e-5)
    g = torch.randn(1000)
    a, b = TopK(0.05, method="exact"), TopK(0.05, method="exact")
    pa, ctx = a.compress(g.numpy(), name="g")
    pb, _ = b.compress(g, name="g")
    np.testing.assert_array_equal(pa, pb)
    dense = torch.empty(1000)
    assert a.decompress(torch.from_numpy(pa), ctx, out=dense) is dense
    np.testing.assert_array_equal(dense.numpy(), a.decompress(pa, ctx))


def test_pool_arrays_become_torch_tensors_without_a_copy():
    pool = HostPool()
    arr = pool.zeros((128, 128), "float32")
    t = torch.from_dlpack(arr)
    t += 2.0
    assert float(arr[5, 7]) == 2.0  # the same memory
    del arr
    assert pool.stats()["allocated_bytes.all.current"] > 0  # the tensor holds the block
    del t
    assert pool.stats()["allocated_bytes.all.current"] == 0
