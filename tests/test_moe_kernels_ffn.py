"""The fused GELU expert FFN and the router products (``moecore.moe_kernels``) against plain
numpy references computed in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moecore import moe_kernels as mk
from moecore.kernels import generic


def gelu64(h: np.ndarray) -> np.ndarray:
    return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def gelu_grad64(h: np.ndarray) -> np.ndarray:
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (h + 0.044715 * h**3))
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * h * h)


def reference(x, counts, w1, w2, dy):
    """Forward and backward of the expert FFN, one expert block at a time, in float64."""
    x, w1, w2, dy = (a.astype(np.float64) for a in (x, w1, w2, dy))
    h = np.zeros((x.shape[0], w1.shape[2]))
    y = np.zeros((x.shape[0], w2.shape[2]))
    dx, dw1, dw2 = np.zeros_like(x), np.zeros_like(w1), np.zeros_like(w2)
    start = 0
    for e, n in enumerate(counts):
        rows = slice(start, start + int(n))
        start += int(n)
        h[rows] = x[rows] @ w1[e]
        a = gelu64(h[rows])
        y[rows] = a @ w2[e]
        dh = (dy[rows] @ w2[e].T) * gelu_grad64(h[rows])
        dx[rows] = dh @ w1[e].T
        dw1[e] = x[rows].T @ dh
        dw2[e] = a.T @ dy[rows]
    return h, gelu64(h), y, dx, dw1, dw2


def inputs(counts, d_in=32, hidden=48, d_out=24, seed=0):
    rng = np.random.default_rng(seed)
    r, e = int(sum(counts)), len(counts)
    f32 = np.float32
    return (
        rng.standard_normal((r, d_in)).astype(f32),
        np.asarray(counts, dtype=np.int32),
        (rng.standard_normal((e, d_in, hidden)) / math.sqrt(d_in)).astype(f32),
        (rng.standard_normal((e, hidden, d_out)) / math.sqrt(hidden)).astype(f32),
        rng.standard_normal((r, d_out)).astype(f32),
    )


@pytest.mark.parametrize(
    "counts",
    [
        [5, 0, 300, 1, 0, 70],  # empty experts, a one-row expert, one spanning several tiles
        [0, 0, 0],  # no rows at all
        [2048, 17],  # a big expert: many tiles side by side
    ],
)
@pytest.mark.parametrize("module", [mk, generic], ids=["rust", "generic"])
def test_gelu_ffn_matches_numpy(module, counts):
    x, c, w1, w2, dy = inputs(counts)
    h, a, y, dx, dw1, dw2 = reference(x, c, w1, w2, dy)
    got_h, got_a, got_y = module.gelu_ffn(x, c, w1, w2)
    for got, want in ((got_h, h), (got_a, a), (got_y, y)):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    grads = module.gelu_ffn_backward(x, c, w1, w2, got_h, got_a, dy)
    for got, want in zip(grads, (dx, dw1, dw2)):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


def test_gelu_ffn_equals_the_unfused_kernels_bit_for_bit_in_the_activation():
    """h and a are the same GEMM and the same GELU arithmetic as the unfused path."""
    x, c, w1, w2, _ = inputs([40, 0, 13])
    h, a, _ = mk.gelu_ffn(x, c, w1, w2)
    from moecore import _core

    np.testing.assert_array_equal(a, _core.fused_gelu(h))


def test_gelu_ffn_rejects_inconsistent_input():
    x, c, w1, w2, dy = inputs([3, 4])
    with pytest.raises(ValueError, match="w2: expected shape"):
        mk.gelu_ffn(x, c, w1, w2[:, :-1].copy())
    with pytest.raises(ValueError, match="counts: expected entries summing to R = 7"):
        mk.gelu_ffn(x, np.array([3, 3], np.int32), w1, w2)
    with pytest.raises(ValueError, match="x_sorted: expected shape"):
        mk.gelu_ffn(x[:, :-1].copy(), c, w1, w2)
    with pytest.raises(ValueError, match="w1: expected a 3-D numpy array of float32"):
        mk.gelu_ffn(x, c, w1.astype(np.float64), w2)
    h, a, _ = mk.gelu_ffn(x, c, w1, w2)
    with pytest.raises(ValueError, match="d_y: expected shape"):
        mk.gelu_ffn_backward(x, c, w1, w2, h, a, dy[:-1].copy())
    with pytest.raises(ValueError, match="h: expected a C-contiguous array"):
        mk.gelu_ffn_backward(x, c, w1, w2, np.asfortranarray(h), a, dy)


@pytest.mark.parametrize("module", [mk, generic], ids=["rust", "generic"])
def test_router_products_match_numpy(module):
    rng = np.random.default_rng(1)
    t, d, e = 300, 40, 6
    x = rng.standard_normal((t, d)).astype(np.float32)
    w = rng.standard_normal((e, d)).astype(np.float32)
    g = rng.standard_normal((t, e)).astype(np.float32)
    dx0 = rng.standard_normal((t, d)).astype(np.float32)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    np.testing.assert_allclose(module.router_logits(x, w), x64 @ w64.T, rtol=1e-5, atol=1e-5)
    dx = dx0.copy()
    dw = module.router_backward(g, x, w, dx)
    np.testing.assert_allclose(dx, dx0 + g64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, g64.T @ x64, rtol=1e-5, atol=1e-4)


def test_router_products_reject_bad_input():
    x = np.ones((5, 4), np.float32)
    w = np.ones((3, 4), np.float32)
    g = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError, match="router_w: expected shape"):
        mk.router_logits(x, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="d_logits: expected shape"):
        mk.router_backward(np.ones((5, 2), np.float32), x, w, np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="d_x: expected shape"):
        mk.router_backward(g, x, w, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="d_x: expected a C-contiguous array"):
        mk.router_backward(g, x, w, np.zeros((4, 5), np.float32).T)
    with pytest.raises(ValueError, match="d_x: expected a 2-D numpy array of float32"):
        mk.router_backward(g, x, w, np.zeros((5, 4), np.float64))
    frozen = np.zeros((5, 4), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="d_x: cannot be written"):
        mk.router_backward(g, x, w, frozen)
