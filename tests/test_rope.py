"""Rotary position embeddings, checked independently of ``apply_rope``/``_rope_backward``
(which the fused float32 and the float64 paths share): the forward against a complex-number
rotation written here, the backward against finite differences (float64), and a model with
``position = "rope"`` that trains. Also ``ops.cast``."""

import io
import os
from pathlib import Path

import numpy as np
import pytest

import moecore as mc
from moecore import ops
from moecore.autograd import gradcheck
from moecore.ops.attention import rope_tables
from moecore.train import Trainer, build_config
from moecore.train.metrics import read_metrics


def reference_rope_attention(qkv, n_heads, causal, base=10000.0):
    """Attention of packed ``qkv [B, T, 3·D]`` with each head's dimension pairs (i, i + half)
    rotated as the complex number x_i + j·x_{i+half} times exp(j·t·base^(-2i/hd))."""
    b, t, three_d = qkv.shape
    d = three_d // 3
    hd = d // n_heads
    half = hd // 2
    heads = qkv.reshape(b, t, 3, n_heads, hd).transpose(2, 0, 3, 1, 4)  # 3, B, H, T, hd
    theta = base ** (-2.0 * np.arange(half) / hd)
    turn = np.exp(1j * np.arange(t)[:, None] * theta[None, :])  # T, half

    def rotate(x):
        z = (x[..., :half] + 1j * x[..., half:]) * turn
        return np.concatenate([z.real, z.imag], axis=-1)

    q, k, v = rotate(heads[0]), rotate(heads[1]), heads[2]
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    if causal:
        scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, t, d)


@pytest.mark.parametrize("causal", [True, False])
def test_rope_attention_matches_a_complex_rotation_reference(causal):
    r = np.random.default_rng(7)
    qkv = r.standard_normal((2, 33, 3 * 2 * 8))
    want = reference_rope_attention(qkv, 2, causal)
    got64 = ops.packed_attention(
        mc.Tensor(qkv), 2, causal=causal, rope=rope_tables(33, 8, dtype=np.float64)
    )
    np.testing.assert_allclose(got64.data, want, rtol=1e-10, atol=1e-12)
    got32 = ops.packed_attention(
        mc.Tensor(qkv.astype(np.float32)), 2, causal=causal, rope=rope_tables(33, 8)
    )
    np.testing.assert_allclose(got32.data, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_rope_attention_gradcheck(causal):
    """Finite differences of the forward (float64): the backward's rotation transpose."""
    rope = rope_tables(5, 4, dtype=np.float64)
    x = mc.Tensor(np.random.default_rng(3).standard_normal((2, 5, 3 * 3 * 4)), requires_grad=True)
    assert gradcheck(lambda a: ops.packed_attention(a, 3, causal=causal, rope=rope), [x])


def test_fused_float32_rope_gradient_matches_finite_differences_of_the_reference():
    """The fused float32 path's gradient (rope applied around the Rust kernel) against
    central differences of the float64 reference, along random directions."""
    r = np.random.default_rng(11)
    qkv = r.standard_normal((1, 9, 3 * 2 * 4))
    g = r.standard_normal((1, 9, 2 * 4))
    x = mc.Tensor(qkv.astype(np.float32), requires_grad=True)
    ops.packed_attention(x, 2, rope=rope_tables(9, 4)).backward(g.astype(np.float32))
    h = 1e-6
    for _ in range(5):
        u = r.standard_normal(qkv.shape)
        plus = (reference_rope_attention(qkv + h * u, 2, True) * g).sum()
        minus = (reference_rope_attention(qkv - h * u, 2, True) * g).sum()
        numeric = (plus - minus) / (2 * h)
        analytic = float((x.grad.astype(np.float64) * u).sum())
        assert abs(analytic - numeric) <= 1e-4 * (1 + abs(numeric)), (analytic, numeric)


def test_a_rope_model_trains_and_its_loss_falls(tmp_path):
    root = Path(os.__file__).parent
    text = b"".join(p.read_bytes() for p in sorted(root.glob("[a-c]*.py")))
    data = tmp_path / "corpus.txt"
    data.write_bytes(text[:200_000])
    overrides = {"position": "rope", "steps": 30, "decay_steps": 30, "eval_every": 0}
    overrides.update(checkpoint_every=0, seq_len=32, batch_size=4, data=str(data))
    trainer = Trainer(
        build_config("moe-tiny", overrides=overrides), tmp_path / "run", out=io.StringIO()
    )
    names = [n for n, _ in trainer.model.named_parameters()]
    assert "pos_emb" not in names, names  # positions come from the rotation alone
    trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 30 and all(np.isfinite(losses)), losses
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses


def test_cast_converts_values_and_its_gradient_back():
    a = np.array([[1.0 + 2**-30, -3.5], [1e-40, 7.25]])
    x = mc.Tensor(a, requires_grad=True)
    y = ops.cast(x, np.float32)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y.data, a.astype(np.float32))
    upstream = np.array([[0.5, -2.0], [3.0, 0.25]], np.float32)
    (y * mc.Tensor(upstream)).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad, upstream.astype(np.float64))
    # and the other way: a float32 leaf through float64 ops gets a float32 gradient
    w = mc.Tensor(np.array([0.1, 0.2, 0.3], np.float32), requires_grad=True)
    z = ops.cast(w, np.float64)
    assert z.dtype == np.float64
    (z * z).sum().backward()
    assert w.grad.dtype == np.float32
    np.testing.assert_allclose(w.grad, 2 * w.data, rtol=1e-7)
