"""Every runtime face takes any CPU DLPack exporter in place (no copy) and refuses, naming the
argument, what it could only take with a copy. Torch-free: the exporters here are numpy's own
``__dlpack__`` behind a foreign type (the torch versions are in tests/torch/)."""

import numpy as np
import pytest

from moecore import moe_kernels as mk
from moecore.backend import as_array
from moecore.compress import TopK, decompress, decompress_sum
from moecore.pool import HostPool
from moecore.sparse import BsrMatrix, bsr_linear, bsr_linear_dw, bsr_linear_dx

F32 = np.float32


class Exporter:
    """A foreign array type that only speaks DLPack (not a numpy subclass, no ``__array__``)."""

    def __init__(self, a, device=None):
        self.a = a
        self.device = device

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device or self.a.__dlpack_device__()


class Refusing(Exporter):
    """An exporter that cannot export (as torch refuses a tensor that requires grad)."""

    def __dlpack__(self, **kwargs):
        raise BufferError("cannot export this tensor")


def test_the_doorway_views_an_exporter_in_place():
    a = np.arange(12, dtype=F32).reshape(3, 4)
    v = as_array(Exporter(a), "x")
    assert isinstance(v, np.ndarray) and v.shape == a.shape and v.dtype == a.dtype
    assert np.shares_memory(v, a)
    assert as_array(a, "x") is a
    assert as_array([1, 2], "x") == [1, 2]  # not an array: left to the caller's own check


@pytest.mark.parametrize("gpu", [False, True])
def test_the_doorway_refuses_what_it_cannot_view(gpu):
    a = np.zeros(4, F32)
    with pytest.raises(TypeError, match=r"grad: could not view Refusing through DLPack"):
        as_array(Refusing(a), "grad", gpu=gpu)
    with pytest.raises(TypeError, match=r"grad: Exporter lives on DLPack device 4"):
        as_array(Exporter(a, device=(4, 0)), "grad", gpu=gpu)  # OpenCL
    if not gpu:
        with pytest.raises(NotImplementedError, match=r"grad is a CUDA Exporter .*no GPU path"):
            as_array(Exporter(a, device=(2, 0)), "grad")


def _layer(seed=0, t=24, d=16, e=4, k=2, hidden=32):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((t, d), dtype=F32),
        rng.standard_normal((e, d), dtype=F32),
        rng.standard_normal((e, d, hidden), dtype=F32) * F32(0.2),
        rng.standard_normal((e, hidden, d), dtype=F32) * F32(0.2),
        k,
    )


def _forward_backward(x, router_w, w1, w2, k, wrap):
    """The whole MoE layer forward and backward through moe_kernels, every array argument
    passed through ``wrap``; returns every result."""
    e = router_w.shape[0]
    logits = mk.router_logits(wrap(x), wrap(router_w))
    idx, weights, probs = mk.route(wrap(logits), k, bias=wrap(np.zeros(e, F32)))
    x_sorted, order, counts = mk.permute(wrap(x), wrap(idx), e, weights=wrap(weights))
    h, a, y_sorted = mk.gelu_ffn(wrap(x_sorted), wrap(counts), wrap(w1), wrap(w2))
    h2 = mk.grouped_matmul(wrap(x_sorted), wrap(counts), wrap(w1))
    y = mk.unpermute(wrap(y_sorted), wrap(order), wrap(weights))
    dy = np.ones_like(y)
    d_ys, d_w = mk.unpermute_backward(wrap(dy), wrap(y_sorted), wrap(order), wrap(weights))
    d_xs, d_w1, d_w2 = mk.gelu_ffn_backward(
        wrap(x_sorted), wrap(counts), wrap(w1), wrap(w2), wrap(h), wrap(a), wrap(d_ys)
    )
    gdx = mk.grouped_matmul_dx(wrap(d_ys), wrap(counts), wrap(w2))
    gdw = mk.grouped_matmul_dw(wrap(a), wrap(d_ys), wrap(counts))
    d_x = mk.permute_backward(wrap(d_xs), wrap(order), x.shape[0], k)
    d_logits = mk.route_backward(wrap(d_w), wrap(idx), wrap(probs))
    d_router = mk.router_backward(wrap(d_logits), wrap(x), wrap(router_w), wrap(d_x))
    forward = [logits, idx, weights, probs, x_sorted, order, counts, h, a, y_sorted, h2, y]
    return [*forward, d_ys, d_w, d_xs, d_w1, d_w2, gdx, gdw, d_x, d_logits, d_router]


def test_moe_kernels_take_exporters_and_give_the_numpy_results():
    args = _layer()
    want = _forward_backward(*args, wrap=lambda a: a)
    got = _forward_backward(*args, wrap=Exporter)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_router_backward_writes_into_the_exporters_memory():
    x, router_w, *_ = _layer()
    d_logits = np.ones((x.shape[0], router_w.shape[0]), F32)
    d_x = np.zeros_like(x)
    mk.router_backward(Exporter(d_logits), Exporter(x), Exporter(router_w), Exporter(d_x))
    np.testing.assert_allclose(d_x, d_logits @ router_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("arg", "bad", "error", "pattern"),
    [
        ("logits", lambda a: np.asfortranarray(a), ValueError, r"logits: expected a C-contiguous"),
        ("logits", lambda a: a.astype(np.float64), ValueError, r"logits: .*float64"),
        ("logits", lambda a: a, NotImplementedError, r"logits is a CUDA Exporter"),
        ("bias", lambda a: a[:, 0].copy()[::2], ValueError, r"bias: "),
    ],
)
def test_moe_kernels_refuse_what_needs_a_copy_naming_the_argument(arg, bad, error, pattern):
    logits = np.random.default_rng(1).standard_normal((6, 8), dtype=F32)
    cuda = (2, 0) if error is NotImplementedError else None
    kwargs = {"logits": logits, "bias": None}
    kwargs[arg] = Exporter(bad(logits), device=cuda)
    with pytest.raises(error, match=pattern):
        mk.route(kwargs["logits"], 2, bias=kwargs["bias"])


def test_sparse_products_take_exporters_in_place():
    w = BsrMatrix.random((32, 64), block=8, density=0.5, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64), dtype=F32)
    dy = rng.standard_normal((5, 32), dtype=F32)
    bias = rng.standard_normal(32, dtype=F32)
    np.testing.assert_array_equal(
        bsr_linear(Exporter(x), w, Exporter(bias)), bsr_linear(x, w, bias)
    )
    np.testing.assert_array_equal(bsr_linear_dx(Exporter(dy), w), bsr_linear_dx(dy, w))
    np.testing.assert_array_equal(
        bsr_linear_dw(Exporter(dy), Exporter(x), w), bsr_linear_dw(dy, x, w)
    )
    buf = np.zeros((5, 32), F32)
    out = Exporter(buf)
    assert bsr_linear(Exporter(x), w, out=out) is out  # the caller's own object back
    np.testing.assert_allclose(buf, x @ w.to_dense().T, rtol=1e-5, atol=1e-5)


def test_bsr_matrix_keeps_an_exporters_values_by_reference():
    dense = BsrMatrix.random((16, 16), block=8, density=1.0, seed=2)
    values = dense.data.copy()
    w = BsrMatrix(dense.shape, 8, dense.indptr, dense.indices, Exporter(values))
    values *= 2  # an optimizer stepping the exporter's memory in place
    x = np.ones((1, 16), F32)
    np.testing.assert_allclose(bsr_linear(x, w), 2 * bsr_linear(x, dense), rtol=1e-6)


def test_sparse_refuses_a_strided_exporter_naming_it():
    w = BsrMatrix.random((16, 16), block=8, density=1.0, seed=0)
    x = np.ones((4, 32), F32)[:, ::2]
    with pytest.raises(ValueError, match=r"x: expected a C-contiguous array"):
        bsr_linear(Exporter(x), w)


def test_compress_takes_exporter_gradients_payloads_and_outputs():
    g = np.random.default_rng(3).standard_normal(1000, dtype=F32)
    a, b = TopK(0.05, method="exact"), TopK(0.05, method="exact")
    for _ in range(3):  # error feedback: the residuals stay equal too
        pa, ctx = a.compress(g, name="w")
        pb, _ = b.compress(Exporter(g), name="w")
        np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(decompress(Exporter(pa), ctx), decompress(pa, ctx))
    buf = np.zeros(1000, F32)
    out = Exporter(buf)
    assert decompress_sum([Exporter(pa), pa], out, scale=0.5) is out
    np.testing.assert_array_equal(buf, decompress(pa, ctx))
    with pytest.raises(TypeError, match=r"payloads\[0\] must be a 1-D uint8 array"):
        decompress_sum([Exporter(g)], buf)


def test_pool_arrays_export_in_place_and_keep_their_memory_while_viewed():
    pool = HostPool()
    arr = pool.empty((256, 256), "float32")
    arr[:] = 3.0
    viewed = np.from_dlpack(Exporter(arr))  # as torch.from_dlpack(pool array) would
    assert np.shares_memory(viewed, arr)
    del arr
    assert pool.stats()["allocated_bytes.all.current"] > 0  # the view keeps the block
    assert float(viewed.sum()) == 3.0 * 256 * 256
    del viewed
    assert pool.stats()["allocated_bytes.all.current"] == 0
