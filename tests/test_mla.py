"""Multi-head latent attention: forward against a numpy reference written from the V2/V3
equations, gradchecks with RoPE (and the DAO gate), and the absorbed latent cache of
generation against the plain forward."""

from __future__ import annotations

import numpy as np
import pytest

import moecore as mc
from moecore import nn
from moecore.autograd import gradcheck
from moecore.models import ModelConfig, MoETransformer
from moecore.models.decoding import LatentDecoder
from moecore.ops.attention import rope_tables
from moecore.ops.rotary import rotary
from moecore.train.config import build_config
from moecore.train.generate import generate_ids


def rope_ref(x, dim, heads=False):
    """Rotate-half RoPE of ``x [B, T, (H,) dim]``, position = index along T."""
    inv = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    ang = np.concatenate([np.outer(np.arange(x.shape[1]), inv)] * 2, axis=1)
    ang = ang[:, None] if heads else ang
    rot = np.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], axis=-1)
    return x * np.cos(ang) + rot * np.sin(ang)


def mla_reference(m: nn.MultiHeadLatentAttention, x: np.ndarray) -> np.ndarray:
    """C^Q = W_DQ x, q = W_UQ RMSNorm(C^Q); c^KV = RMSNorm(W_DKV x); k^C = W_UK c, v = W_UV c;
    k^R = RoPE(W_KR x) shared by the heads; softmax((q^C·k^C + q^R·k^R)/sqrt(d_h + d_R))."""
    w = {n: p.data.astype(np.float64) for n, p in m.named_parameters()}
    b, t, _ = x.shape
    h, hd, dr, dc = m.n_heads, m.head_dim, m.rope_dim, m.kv_lora_rank

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6) * g

    q = rms(x @ w["q_down.weight"].T, w["q_norm.weight"]) @ w["q_up.weight"].T
    q = q.reshape(b, t, h, hd + dr)
    down = x @ w["kv_down.weight"].T
    c = rms(down[..., :dc], w["kv_norm.weight"])
    k_r = rope_ref(down[..., dc:], dr)  # [b, t, dr]
    kv = (c @ w["kv_up.weight"].T).reshape(b, t, h, 2 * hd)
    q_r = rope_ref(q[..., hd:], dr, heads=True)
    out = np.zeros((b, t, h, hd))
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi, :hd] @ kv[bi, :, hi, :hd].T + q_r[bi, :, hi] @ k_r[bi].T
            s = s / np.sqrt(hd + dr)
            if m.gate is not None:
                g = 1 / (1 + np.exp(-(x[bi] @ w["gate.weight"].T + w["gate.bias"])))
                s = s * g
            s = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, s)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            out[bi, :, hi] = p @ kv[bi, :, hi, hd:]
    return out.reshape(b, t, h * hd) @ w["proj.weight"].T


def make(gate=None, q_lora_rank=12, dtype=np.float32, seed=0):
    mc.manual_seed(seed)
    return nn.MultiHeadLatentAttention(
        16,
        2,
        kv_lora_rank=6,
        q_lora_rank=q_lora_rank,
        rope_head_dim=4,
        max_len=16,
        gate=gate,
        dtype=dtype,
        init="torch",
    )


@pytest.mark.parametrize("gate", [None, "dao"])
def test_mla_forward_matches_reference(gate):
    m = make(gate)
    x = np.random.default_rng(1).standard_normal((2, 7, 16))
    y = m(mc.Tensor(x.astype(np.float32))).data
    np.testing.assert_allclose(y, mla_reference(m, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("gate", "q_lora_rank"), [(None, 12), (None, 0), ("dao", 12)])
def test_mla_gradcheck_with_rope(gate, q_lora_rank):
    m = make(gate, q_lora_rank)
    m.to(dtype=np.float64)
    x = mc.Tensor(np.random.default_rng(2).standard_normal((2, 6, 16)), requires_grad=True)
    params = list(m.parameters())
    assert gradcheck(lambda x, *p: m(x), [x, *params])


def test_rotary_op_gradcheck_and_positions():
    cos, sin = rope_tables(5, 4)
    x = mc.Tensor(np.random.default_rng(3).standard_normal((2, 5, 3, 4)), requires_grad=True)
    assert gradcheck(lambda a: rotary(a, cos[:, None], sin[:, None]), [x])
    y = rotary(x, cos[:, None], sin[:, None]).data
    np.testing.assert_allclose(y, rope_ref(x.data, 4, heads=True), atol=1e-6)


@pytest.mark.parametrize("gate", [None, "dao"])
def test_absorbed_latent_decode_equals_forward(gate):
    m = make(gate)
    m.eval()
    x = np.random.default_rng(4).standard_normal((2, 9, 16)).astype(np.float32)
    cache = nn.LatentCache()
    parts = [m.decode(x[:, :4], cache), m.decode(x[:, 4:5], cache), m.decode(x[:, 5:], cache)]
    np.testing.assert_allclose(np.concatenate(parts, 1), m(mc.Tensor(x)).data, atol=2e-6)
    # the cache holds only the latent and the shared RoPE key
    assert cache.latent.shape == (2, 9, 6) and cache.rope_key.shape == (2, 9, 4)


def test_model_generation_with_latent_cache_equals_plain_forward():
    cfg = ModelConfig.from_run(build_config("deepseek-tiny", overrides={"seq_len": 24}))
    mc.manual_seed(0)
    model = MoETransformer(cfg)
    model.eval()
    ids = np.random.default_rng(5).integers(0, 256, (2, 24))
    decoder = LatentDecoder(model)
    logits = np.concatenate(
        [decoder.step(ids[:, :10]), decoder.step(ids[:, 10:11]), decoder.step(ids[:, 11:])], 1
    )
    with mc.no_grad():
        full = model(ids).data
    np.testing.assert_allclose(logits, full, atol=1e-5)
    # greedy generation (cache, sliding past seq_len) equals greedy by full recompute
    cached = generate_ids(model, [1, 2, 3], 40, temperature=0)
    plain = []
    seq = [1, 2, 3]
    with mc.no_grad():
        for _ in range(40):
            seq.append(int(np.argmax(model(np.array([seq[-24:]])).data[0, -1])))
    plain = seq[3:]
    assert cached == plain


def test_latent_cache_bytes_per_token_against_mha():
    """MLA caches (kv_lora_rank + rope_head_dim) numbers per token and layer; multi-head
    attention of the same width 2·d_model (V2 Table 1)."""
    cfg = ModelConfig.from_run(build_config("deepseek-small"))
    mc.manual_seed(0)
    model = MoETransformer(cfg)
    model.eval()
    decoder = LatentDecoder(model)
    decoder.step(np.zeros((1, 10), np.int64))
    per_token = decoder.cache_bytes() / 10
    assert per_token == cfg.n_layers * (cfg.kv_lora_rank + cfg.rope_head_dim) * 4
    mha = cfg.n_layers * 2 * cfg.d_model * 4
    assert per_token / mha == pytest.approx((64 + 32) / 512)


def test_mla_bad_arguments():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        nn.MultiHeadLatentAttention(16, 2, kv_lora_rank=16)
    with pytest.raises(ValueError, match="rope_head_dim"):
        nn.MultiHeadLatentAttention(16, 2, kv_lora_rank=4, rope_head_dim=3)
    m = make()
    with pytest.raises(ValueError, match="rotary tables"):
        m(mc.Tensor(np.zeros((1, 17, 16), np.float32)))
