"""DeepSeekMoE from the run configuration: fine-grained and shared experts, sigmoid scores
with normalised top-k gates, the routed scaling factor, the sequence-wise balance loss and
node-limited routing — each against an independent reference."""

from __future__ import annotations

import numpy as np
import pytest

import moecore as mc
from moecore import nn, ops
from moecore.autograd import gradcheck
from moecore.errors import ConfigError
from moecore.models import ModelConfig, MoETransformer
from moecore.train.config import build_config


def seq_balance_reference(logits, idx, alpha, seq_len):
    """V3-TR eqs. 17-20 in float64, one sequence at a time, then the mean."""
    s = 1 / (1 + np.exp(-logits))
    e, k = logits.shape[1], idx.shape[1]
    losses = []
    for start in range(0, logits.shape[0], seq_len):
        sl = slice(start, start + seq_len)
        f = np.bincount(idx[sl].ravel(), minlength=e) * e / (k * seq_len)
        p = (s[sl] / s[sl].sum(axis=1, keepdims=True)).mean(axis=0)
        losses.append(alpha * (f * p).sum())
    return float(np.mean(losses))


def test_sequence_wise_loss_value_matches_formula_and_its_gradient_is_injected():
    r = np.random.default_rng(4)
    b, t, d, e, k, alpha = 3, 5, 6, 8, 2, 0.3
    x = r.standard_normal((b, t, d))
    router = r.standard_normal((e, d))
    w1, w2 = r.standard_normal((e, d, 3)), r.standard_normal((e, 3, d))

    def run(router_):
        stats = {}
        rt = mc.Tensor(router_, requires_grad=True)
        y = ops.moe(
            mc.Tensor(x),
            rt,
            mc.Tensor(w1),
            mc.Tensor(w2),
            k=k,
            score="sigmoid",
            seq_aux_loss=alpha,
            stats=stats,
        )
        return y, rt, stats

    y, rt, stats = run(router)
    logits = x.reshape(-1, d) @ router.T
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    assert stats["seq_aux_loss"] == pytest.approx(
        seq_balance_reference(logits, idx, alpha, t), rel=1e-10
    )
    # zero upstream gradient: the router's gradient is the injected one alone
    y.backward(np.zeros_like(y.data))
    numeric = np.zeros_like(router)
    h = 1e-6
    for i in np.ndindex(router.shape):
        plus, minus = router.copy(), router.copy()
        plus[i] += h
        minus[i] -= h
        numeric[i] = (run(plus)[2]["seq_aux_loss"] - run(minus)[2]["seq_aux_loss"]) / (2 * h)
    np.testing.assert_allclose(rt.grad, numeric, atol=1e-7, rtol=1e-5)


def test_sequence_wise_loss_is_per_sequence_not_per_batch():
    """Two sequences each using one expert only are perfectly unbalanced per sequence
    though the batch as a whole is balanced: the sequence loss sees it, the batch one not."""
    e, d = 2, 2
    x = np.zeros((2, 4, d))
    x[0, :, 0] = 5.0  # sequence 0 → expert 0
    x[1, :, 1] = 5.0  # sequence 1 → expert 1
    router = np.eye(e, d)
    w1, w2 = np.zeros((e, d, 1)), np.zeros((e, 1, d))
    stats = {}
    args = [mc.Tensor(a) for a in (x, router, w1, w2)]
    ops.moe(*args, k=1, score="sigmoid", seq_aux_loss=1.0, aux_loss=1.0, stats=stats)
    s = 1 / (1 + np.exp(-5.0))
    share = s / (s + 0.5)  # the chosen expert's normalised score
    assert stats["seq_aux_loss"] == pytest.approx(2 * share, rel=1e-6)  # E·Σ f·P, f = (2, 0)
    assert stats["aux_loss"] == pytest.approx(1.0, rel=1e-6)  # balanced batch: f = P = ½


def test_moe_gradcheck_with_deepseek_routing():
    r = np.random.default_rng(1)

    def t64(*s):
        return mc.Tensor(r.standard_normal(s), requires_grad=True)

    bias = np.array([0.3, -0.2, 0.0, 0.1, 0.05, -0.1, 0.2, 0.0])
    # (the injected balance-loss gradients are not part of the output: checked above)
    kw = dict(k=3, score="sigmoid", bias=bias, n_groups=4, topk_groups=2)
    inputs = [t64(2, 5, 6), t64(8, 6), t64(8, 6, 3), t64(8, 3, 6)]
    assert gradcheck(lambda x, rw, w1, w2: ops.moe(x, rw, w1, w2, **kw), inputs)


def test_layer_matches_per_token_reference_with_scale_shared_and_groups():
    """nn.MoE with sigmoid scores, biased node-limited selection, normalised gates, the
    routed scale and a shared expert, against a loop over tokens in float64."""
    r = np.random.default_rng(7)
    d, e, k, groups, top_groups, scale = 6, 8, 3, 4, 2, 2.5
    layer = nn.MoE(
        d,
        4,
        e,
        top_k=k,
        score="sigmoid",
        n_shared_experts=1,
        n_groups=groups,
        topk_groups=top_groups,
        bias_update_rate=0.01,
        routed_scale=scale,
        activation="relu",
        dtype=np.float64,
        init="torch",
    )
    layer.expert_bias[...] = r.standard_normal(e) * 0.5
    x = r.standard_normal((2, 5, d))
    y = layer(mc.Tensor(x)).data
    router, w1, w2 = layer.router.data, layer.w1.data, layer.w2.data
    ref = np.zeros_like(x)
    per = e // groups
    for i in np.ndindex(x.shape[:2]):
        s = 1 / (1 + np.exp(-(router @ x[i])))
        biased = s + layer.expert_bias
        group_score = np.sort(biased.reshape(groups, per), axis=1)[:, -2:].sum(axis=1)
        allowed = np.argsort(-group_score, kind="stable")[:top_groups]
        masked = np.where(np.isin(np.arange(e) // per, allowed), biased, -np.inf)
        chosen = np.argsort(-masked, kind="stable")[:k]
        gates = s[chosen] / s[chosen].sum()
        for g, j in zip(gates, chosen):
            ref[i] += scale * g * (np.maximum(x[i] @ w1[j], 0) @ w2[j])
        shared = np.maximum(layer.shared_in.weight.data @ x[i], 0)
        ref[i] += layer.shared_out.weight.data @ shared
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)


def test_config_builds_fine_grained_experts():
    cfg = build_config(
        "moe-tiny",
        overrides={"n_experts": 4, "expert_split": 4, "top_k": 2, "d_ff": 64},
    )
    model = MoETransformer(ModelConfig.from_run(cfg))
    layer = model.moe_layers()[0]
    assert (layer.n_experts, layer.top_k, layer.d_ff) == (16, 8, 16)
    assert layer.w1.shape == (16, 64, 16)
    # splitting keeps the experts' parameter count: E·m experts of d_ff/m
    assert layer.w1.numel() == 4 * 64 * 64


def test_deepseek_tiny_reaches_every_option():
    cfg = build_config("deepseek-tiny")
    model = MoETransformer(ModelConfig.from_run(cfg))
    layer = model.moe_layers()[0]
    assert layer.score == "sigmoid" and layer.routed_scale == 2.5
    assert (layer.n_groups, layer.topk_groups) == (4, 2)
    assert layer.n_shared_experts == 1 and layer.seq_aux_loss > 0 and layer.bias_update_rate > 0
    assert isinstance(model.blocks[0].attn, nn.MultiHeadLatentAttention)
    assert len(model.mtp) == 1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"n_groups": 4, "topk_groups": 5}, "topk_groups"),
        ({"n_groups": 3, "topk_groups": 1}, "n_groups"),
        ({"n_groups": 4, "topk_groups": 0}, "topk_groups"),
        ({"n_groups": 4, "topk_groups": 1, "top_k": 2}, "topk_groups"),
        ({"expert_split": 3}, "expert_split"),
        ({"expert_split": 0}, "expert_split"),
        ({"routed_scale": 0.0}, "routed_scale"),
        ({"seq_aux_loss": -1.0}, "seq_aux_loss"),
        ({"kv_lora_rank": 64}, "kv_lora_rank"),
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"rope_head_dim": 3}, "rope_head_dim"),
        ({"position": "learned"}, "position"),
        ({"attention": "gqa"}, "attention"),
        ({"attention_gate": "yes"}, "attention_gate"),
        ({"mtp_depth": -1}, "mtp_depth"),
        ({"n_groups": 2, "topk_groups": 1, "ep": 4, "batch_size": 8}, "n_groups"),
    ],
)
def test_bad_deepseek_configuration_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_config("deepseek-tiny", overrides=overrides)


def test_node_limited_routing_keeps_each_token_on_at_most_m_ranks():
    """Groups of the expert-parallel layout: 32 experts on ep = 4 ranks as 4 groups (one per
    rank), top-8 within the best 2 groups → every token's rows go to at most 2 ranks."""
    from moecore import moe_kernels as mk

    r = np.random.default_rng(9)
    logits = r.standard_normal((500, 32)).astype(np.float32)
    bias = (r.standard_normal(32) * 0.1).astype(np.float32)
    ranks_of = lambda idx: np.array([len(set(row // 8)) for row in idx])  # noqa: E731
    idx, _, _ = mk.route(logits, 8, "sigmoid", bias, n_groups=4, topk_groups=2)
    assert ranks_of(idx).max() <= 2
    free, _, _ = mk.route(logits, 8, "sigmoid", bias)
    assert ranks_of(free).max() > 2  # without the limit tokens spread further
