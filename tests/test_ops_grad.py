"""Every op: forward against numpy, backward against finite differences (float64)."""

import math

import numpy as np
import pytest

import moecore as mc
from moecore import ops
from moecore.autograd import gradcheck

rng = np.random.default_rng(1234)


def t64(*shape, grad=True, positive=False):
    a = rng.standard_normal(shape)
    if positive:
        a = np.abs(a) + 0.5
    return mc.Tensor(a, requires_grad=grad)


@pytest.mark.parametrize(
    ("fn", "shapes"),
    [
        (lambda a, b: a + b, [(3, 4), (4,)]),
        (lambda a, b: a - b, [(3, 1), (1, 4)]),
        (lambda a, b: a * b, [(2, 3, 4), (3, 1)]),
        (lambda a, b: a / b, [(3, 4), (3, 4)]),
        (lambda a: -a, [(5,)]),
        (lambda a: 2.0 - a, [(5,)]),
        (lambda a: 3.0 / a, [(5,)]),
        (lambda a: a.tanh(), [(5,)]),
        (lambda a: a.sigmoid(), [(5,)]),
        (lambda a: a.relu(), [(7,)]),
        (lambda a: a.exp(), [(5,)]),
        (lambda a, b: a @ b, [(2, 3, 4), (4, 5)]),
        (lambda a, b: a @ b, [(3, 4), (2, 4, 5)]),
        (lambda a: a.sum(axis=1), [(3, 4, 2)]),
        (lambda a: a.mean(axis=(0, 2), keepdims=True), [(3, 4, 2)]),
        (lambda a: a.max(axis=-1), [(3, 4)]),
        (lambda a: a.reshape(4, 3).transpose(), [(3, 4)]),
        (lambda a: a.permute(2, 0, 1), [(2, 3, 4)]),
        (lambda a: a[1:, ::2], [(3, 4)]),
        (lambda a: a[np.array([0, 2, 0])], [(3, 4)]),
        (lambda a, b: ops.concat([a, b], axis=1), [(2, 3), (2, 2)]),
        (lambda a, b: ops.stack([a, b], axis=0), [(2, 3), (2, 3)]),
        (lambda x, w, b: ops.linear(x, w, b), [(2, 3, 4), (5, 4), (5,)]),
        (lambda a: ops.softmax(a, axis=0), [(4, 3)]),
        (lambda a: ops.log_softmax(a), [(4, 3)]),
        (lambda a: ops.gelu(a), [(6,)]),
        (lambda a: ops.gelu(a, approximate="none"), [(6,)]),
        (lambda a: ops.silu(a), [(6,)]),
        (lambda a: ops.swiglu(a), [(3, 8)]),
        (lambda x, w, b: ops.layer_norm(x, w, b), [(2, 3, 6), (6,), (6,)]),
        (lambda x: ops.layer_norm(x, None, None), [(4, 5)]),
        (lambda x, w: ops.rms_norm(x, w), [(2, 3, 6), (6,)]),
        (lambda q, k, v: ops.scaled_dot_product_attention(q, k, v), [(2, 2, 5, 3)] * 3),
        (
            lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, causal=False),
            [(1, 2, 4, 3)] * 3,
        ),
        (lambda x: ops.packed_attention(x, 3), [(2, 4, 18)]),
    ],
)
def test_gradcheck(fn, shapes):
    assert gradcheck(fn, [t64(*s) for s in shapes])


def test_pow_and_log_on_positive_inputs():
    assert gradcheck(lambda a: (a**2.5).log(), [t64(5, positive=True)])


def test_cross_entropy_matches_numpy_and_gradcheck():
    logits = t64(6, 5)
    targets = np.array([0, 4, -100, 2, 2, 1])
    loss = ops.cross_entropy(logits, targets)
    z = logits.data
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    keep = targets != -100
    expected = -logp[np.arange(6)[keep], targets[keep]].mean()
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert gradcheck(lambda z: ops.cross_entropy(z, targets), [logits])
    assert gradcheck(lambda z: ops.cross_entropy(z, targets.reshape(2, 3)), [t64(2, 3, 5)])


def test_cross_entropy_all_ignored_is_zero_and_bad_targets_raise():
    z = t64(2, 3)
    loss = ops.cross_entropy(z, np.array([-100, -100]))
    assert loss.item() == 0.0
    loss.backward()
    np.testing.assert_array_equal(z.grad, 0.0)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
        ops.cross_entropy(z, np.array([0, 3]))
    with pytest.raises(TypeError, match="integers"):
        ops.cross_entropy(z, np.array([0.0, 1.0]))


def test_embedding_forward_and_repeated_ids_gradient():
    w = t64(6, 3)
    ids = np.array([[1, 2, 1], [5, 1, 0]])
    out = ops.embedding(ids, w)
    np.testing.assert_array_equal(out.data, w.data[ids])
    assert gradcheck(lambda w: ops.embedding(ids, w), [w])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\)"):
        ops.embedding(np.array([6]), w)


def test_dropout_scales_kept_and_is_identity_in_eval():
    mc.manual_seed(0)
    x = mc.ones(10000, requires_grad=True)
    y = ops.dropout(x, p=0.25, training=True)
    kept = y.data != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(y.data[kept], 1 / 0.75)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, y.data)  # gradient uses the same mask and scale
    assert ops.dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ops.dropout(x, 1.0)


def test_attention_forward_matches_naive_numpy():
    q, k, v = (t64(1, 2, 5, 4, grad=False) for _ in range(3))
    out = ops.scaled_dot_product_attention(q, k, v).data
    ref = np.zeros_like(out)
    for h in range(2):
        s = q.data[0, h] @ k.data[0, h].T / math.sqrt(4)
        s[np.triu_indices(5, 1)] = -np.inf
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        ref[0, h] = p @ v.data[0, h]
    np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_layer_norm_forward_matches_numpy():
    x = t64(3, 7, grad=False)
    out = ops.layer_norm(x, None, None, eps=1e-5).data
    ref = (x.data - x.data.mean(-1, keepdims=True)) / np.sqrt(x.data.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, ref, rtol=1e-10)


def test_checkpoint_gives_same_gradients_and_replays_dropout():
    mc.manual_seed(3)
    w = t64(4, 4)
    x = t64(3, 4)

    def block(a):
        return ops.dropout(ops.gelu(ops.linear(a, w)), 0.3)

    mc.manual_seed(5)
    plain = block(x).sum()
    plain.backward()
    gw, gx = w.grad.copy(), x.grad.copy()
    w.grad = x.grad = None
    mc.manual_seed(5)
    ck = ops.checkpoint(block, x).sum()
    assert ck.item() == pytest.approx(plain.item(), rel=1e-12)
    ck.backward()
    np.testing.assert_allclose(w.grad, gw, rtol=1e-12)
    np.testing.assert_allclose(x.grad, gx, rtol=1e-12)


def test_float32_ops_keep_float32():
    x = mc.randn(3, 4, requires_grad=True)
    y = ops.gelu(ops.layer_norm(x, None, None)).mean()
    y.backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_rope", [False, True])
def test_fused_float32_attention_matches_float64_reference(causal, use_rope):
    from moecore.ops.attention import rope_tables

    r = np.random.default_rng(5)
    qkv = r.standard_normal((2, 70, 3 * 3 * 8))
    g = r.standard_normal((2, 70, 3 * 8))
    rope64 = rope_tables(70, 8, dtype=np.float64) if use_rope else None
    rope32 = rope_tables(70, 8) if use_rope else None
    outs = {}
    for dtype, rope in ((np.float64, rope64), (np.float32, rope32)):
        x = mc.Tensor(qkv.astype(dtype), requires_grad=True)
        y = ops.packed_attention(x, 3, causal=causal, rope=rope)
        y.backward(g.astype(dtype))
        outs[dtype] = (y.data, x.grad)
    np.testing.assert_allclose(outs[np.float32][0], outs[np.float64][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[np.float32][1], outs[np.float64][1], rtol=1e-3, atol=1e-4)


def test_fused_float32_gelu_matches_float64_reference():
    x = np.linspace(-9, 9, 10001)
    g = np.cos(x)
    res = {}
    for dtype in (np.float64, np.float32):
        t = mc.Tensor(x.astype(dtype), requires_grad=True)
        y = ops.gelu(t)
        y.backward(g.astype(dtype))
        res[dtype] = (y.data, t.grad)
    np.testing.assert_allclose(res[np.float32][0], res[np.float64][0], atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(res[np.float32][1], res[np.float64][1], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_float32_norms_match_float64_reference(kind, affine):
    """The Rust float32 norm (forward and all three gradients) against the float64 path."""
    r = np.random.default_rng(11)
    x = r.standard_normal((3, 37, 48)) * 3 + 1
    w, b = r.standard_normal(48), r.standard_normal(48)
    g = r.standard_normal((3, 37, 48))
    res = {}
    for dtype in (np.float64, np.float32):
        xt = mc.Tensor(x.astype(dtype), requires_grad=True)
        wt = mc.Tensor(w.astype(dtype), requires_grad=True) if affine else None
        bt = mc.Tensor(b.astype(dtype), requires_grad=True) if affine else None
        y = ops.layer_norm(xt, wt, bt) if kind == "layer" else ops.rms_norm(xt, wt)
        y.backward(g.astype(dtype))
        grads = [xt.grad] + ([wt.grad] + ([bt.grad] if kind == "layer" else []) if affine else [])
        res[dtype] = (y.data, grads)
    np.testing.assert_allclose(res[np.float32][0], res[np.float64][0], rtol=1e-4, atol=1e-5)
    for got, want in zip(res[np.float32][1], res[np.float64][1]):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    if kind == "rms" and affine:
        assert bt.grad is None
