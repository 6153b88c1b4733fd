"""Dynamic attention gating ("DAO"): g = sigmoid(Linear(d → 1)(x)) per query position
scales that query's attention logits before the softmax."""

from __future__ import annotations

import numpy as np
import pytest

import moecore as mc
from moecore import nn
from moecore.autograd import gradcheck
from moecore.models import ModelConfig, MoETransformer
from moecore.train.config import build_config


def gated_attention_reference(layer: nn.Attention, x: np.ndarray) -> np.ndarray:
    """Per head: softmax(g_t · q_t·k_s / sqrt(d_h), causal) v, in float64."""
    b, t, d = x.shape
    h, hd = layer.n_heads, d // layer.n_heads
    qkv = x @ layer.qkv.weight.data.T.astype(np.float64)
    q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, t, h, hd) for i in range(3))
    g = 1 / (1 + np.exp(-(x @ layer.gate.weight.data.T + layer.gate.bias.data)))  # [b, t, 1]
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd) * g[:, None, :, :]
    s = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", p, v).reshape(b, t, d)
    return out @ layer.proj.weight.data.T


def test_dao_gate_scales_each_querys_logits():
    mc.manual_seed(0)
    layer = nn.Attention(16, 2, gate="dao", init="torch")
    x = np.random.default_rng(0).standard_normal((2, 6, 16))
    y = layer(mc.Tensor(x.astype(np.float32))).data
    np.testing.assert_allclose(y, gated_attention_reference(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_dao_gate_gradcheck(rope):
    mc.manual_seed(1)
    layer = nn.Attention(8, 2, gate="dao", rope=rope, max_len=8, dtype=np.float64)
    x = mc.Tensor(np.random.default_rng(1).standard_normal((2, 5, 8)), requires_grad=True)
    assert gradcheck(lambda x, *p: layer(x), [x, *layer.parameters()])


def test_dao_gate_from_the_run_configuration():
    for attention in ("mha", "mla"):
        cfg = build_config(
            "deepseek-tiny", overrides={"attention_gate": "dao", "attention": attention}
        )
        model = MoETransformer(ModelConfig.from_run(cfg))
        assert all(b.attn.gate is not None for b in model.blocks)
        assert model.blocks[0].attn.gate.weight.shape == (1, cfg.d_model)
    with pytest.raises(ValueError, match="gate"):
        nn.Attention(8, 2, gate="sigmoid")
