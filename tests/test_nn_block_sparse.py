"""Block-sparse linear: op gradients, Rust path against the dense reference, pruning."""

import numpy as np
import pytest

import moecore as mc
from moecore import nn, ops, optim
from moecore.autograd import gradcheck
from moecore.nn.block_sparse import cubic_density
from moecore.sparse import BsrMatrix


def test_gradcheck_float64_generic_path():
    w = BsrMatrix.random((32, 48), 8, 0.4, seed=1)
    r = np.random.default_rng(0)
    x = mc.Tensor(r.standard_normal((3, 5, 48)), requires_grad=True)
    d = mc.Tensor(w.data.astype(np.float64), requires_grad=True)
    b = mc.Tensor(r.standard_normal(32), requires_grad=True)
    assert gradcheck(lambda x, d, b: ops.block_sparse_linear(x, d, w, b), [x, d, b])


@pytest.mark.parametrize("block", [8, 16, 32])
def test_float32_rust_path_matches_dense_numpy(block):
    w = BsrMatrix.random((2 * block * 2, 3 * block), block, 0.5, seed=block)
    r = np.random.default_rng(1)
    x = r.standard_normal((7, 3 * block)).astype(np.float32)
    dy = r.standard_normal((7, 4 * block)).astype(np.float32)
    xt = mc.Tensor(x.copy(), requires_grad=True)
    dt = mc.Tensor(w.data, requires_grad=True)
    y = ops.block_sparse_linear(xt, dt, w)
    y.backward(dy)
    dense = w.to_dense().astype(np.float64)
    np.testing.assert_allclose(y.data, x @ dense.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xt.grad, dy @ dense, rtol=1e-4, atol=1e-4)
    full = dy.T.astype(np.float64) @ x
    # the gradient exists only at kept blocks, and equals the dense gradient there
    rows = np.repeat(np.arange(len(w.indptr) - 1), np.diff(w.indptr))
    for n, (i, j) in enumerate(zip(rows, w.indices)):
        np.testing.assert_allclose(
            dt.grad[n],
            full[i * block : (i + 1) * block, j * block : (j + 1) * block],
            rtol=1e-4,
            atol=1e-4,
        )
    assert dt.grad.shape == (w.nnzb, block, block)


def test_module_trains_and_prunes_on_schedule():
    mc.manual_seed(0)
    layer = nn.BlockSparseLinear(
        64, 64, block=16, density=0.25, initial_density=1.0, prune_start=0, prune_end=10, seed=3
    )
    assert layer.matrix.nnzb == 16
    opt = optim.AdamW(layer.parameters(), lr=1e-2)
    x = mc.randn(8, 64)
    kept = []
    for step in range(12):
        loss = (layer(x) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        norms_before = np.sqrt((layer.weight.data**2).sum(axis=(1, 2)))
        n = layer.prune(step + 1, opt)
        kept.append(n)
        if n < len(norms_before):
            # the survivors are the largest blocks
            survivors = np.sqrt((layer.weight.data**2).sum(axis=(1, 2)))
            assert survivors.min() >= np.sort(norms_before)[-n] - 1e-6
        st = opt.state[id(layer.weight)]
        assert st["exp_avg"].shape == layer.weight.shape
    assert kept == sorted(kept, reverse=True) and kept[-1] == 4
    y = layer(x).data
    np.testing.assert_allclose(
        y, x.data @ layer.matrix.to_dense().T + layer.bias.data, rtol=1e-4, atol=1e-5
    )


def test_cubic_schedule_and_errors():
    assert cubic_density(0, 1.0, 0.1, 0, 100) == 1.0
    assert cubic_density(50, 1.0, 0.1, 0, 100) == pytest.approx(0.1 + 0.9 * 0.125)
    assert cubic_density(100, 1.0, 0.1, 0, 100) == 0.1
    with pytest.raises(ValueError, match="density"):
        nn.BlockSparseLinear(32, 32, block=16, density=0.5, initial_density=0.25)
    layer = nn.BlockSparseLinear(32, 32, block=16, density=0.5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
        layer(mc.randn(2, 16))
