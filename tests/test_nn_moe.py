"""The MoE layer: against a naive per-token numpy loop, gradients, aux-loss injection,
capacity dropping, shared experts, sigmoid + bias balancing, routing statistics."""

import math

import numpy as np
import pytest

import moecore as mc
from moecore import nn, ops
from moecore.autograd import gradcheck
from moecore.ops.activation import erf  # noqa: F401 - imported to make sure it exists


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def naive_moe(x, router, w1, w2, k, score="softmax", bias=None, capacity=None, activation="gelu"):
    """One token at a time, one expert at a time, in float64."""
    x, router, w1, w2 = (np.asarray(a, np.float64) for a in (x, router, w1, w2))
    t, e = x.shape[0], router.shape[0]
    logits = x @ router.T
    if score == "softmax":
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    else:
        p = 1 / (1 + np.exp(-logits))
    choice = p + (0 if bias is None else bias)
    chosen = [sorted(range(e), key=lambda i, row=row: (-choice[row, i], i))[:k] for row in range(t)]
    weights = np.array([[p[row, i] for i in chosen[row]] for row in range(t)])
    if k > 1:
        weights /= weights.sum(1, keepdims=True)
    keep = np.ones((t, k), bool)
    if capacity is not None:
        for ex in range(e):
            users = [
                (weights[r, j], -(r * k + j), r, j)
                for r in range(t)
                for j in range(k)
                if chosen[r][j] == ex
            ]
            users.sort(reverse=True)
            for _, _, r, j in users[capacity:]:
                keep[r, j] = False
    y = np.zeros((t, w2.shape[2]))
    for row in range(t):
        for j, ex in enumerate(chosen[row]):
            if not keep[row, j]:
                continue
            h = x[row] @ w1[ex]
            if activation == "gelu":
                a = gelu_tanh(h)
            elif activation == "relu":
                a = np.maximum(h, 0)
            else:
                half = h.size // 2
                a = h[:half] / (1 + np.exp(-h[:half])) * h[half:]
            y[row] += weights[row, j] * (a @ w2[ex])
    return y, np.array(chosen), keep


def layer_inputs(t, d, e, h, gate=1, dtype=np.float32, seed=0):
    r = np.random.default_rng(seed)
    return (
        r.standard_normal((t, d)).astype(dtype),
        r.standard_normal((e, d)).astype(dtype),
        (r.standard_normal((e, d, gate * h)) / math.sqrt(d)).astype(dtype),
        (r.standard_normal((e, h, d)) / math.sqrt(h)).astype(dtype),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("e", "k", "score", "activation", "capacity_factor"),
    [
        (4, 1, "softmax", "gelu", None),
        (4, 2, "softmax", "gelu", None),
        (4, 4, "softmax", "swiglu", None),
        (6, 2, "sigmoid", "relu", None),
        (4, 2, "softmax", "gelu", 0.5),
        (1, 1, "softmax", "gelu", None),
    ],
)
def test_moe_op_matches_naive_loop(dtype, e, k, score, activation, capacity_factor):
    t, d, h = 24, 8, 6
    gate = 2 if activation == "swiglu" else 1
    x, router, w1, w2 = layer_inputs(t, d, e, h, gate, dtype)
    stats = {}
    y = ops.moe(
        mc.Tensor(x),
        mc.Tensor(router),
        mc.Tensor(w1),
        mc.Tensor(w2),
        k=k,
        score=score,
        activation=activation,
        capacity_factor=capacity_factor,
        stats=stats,
    )
    cap = None if capacity_factor is None else max(1, math.ceil(capacity_factor * t * k / e))
    ref, chosen, keep = naive_moe(x, router, w1, w2, k, score, None, cap, activation)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(y.data, ref, rtol=tol, atol=tol)
    np.testing.assert_array_equal(
        stats["tokens_per_expert"], np.bincount(chosen.ravel(), minlength=e)
    )
    assert stats["dropped"] == int((~keep).sum())


def test_moe_gradcheck_with_every_feature():
    r = np.random.default_rng(1)

    def t64(*s):
        return mc.Tensor(r.standard_normal(s), requires_grad=True)

    cases = [
        dict(k=1, score="softmax"),
        dict(k=2, score="softmax"),
        dict(k=4, score="softmax", activation="swiglu"),
        dict(k=2, score="sigmoid", bias=np.array([0.3, -0.2, 0.0, 0.1])),
        dict(k=2, score="softmax", capacity_factor=0.5),
        dict(k=2, score="softmax", n_groups=2, topk_groups=1),
    ]
    for kw in cases:
        gate = 2 if kw.get("activation") == "swiglu" else 1
        inputs = [t64(2, 5, 6), t64(4, 6), t64(4, 6, gate * 3), t64(4, 3, 6)]
        assert gradcheck(lambda x, rw, w1, w2, kw=kw: ops.moe(x, rw, w1, w2, **kw), inputs), kw


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_and_z_loss_gradients_are_injected(score):
    """With zero upstream gradient, backward must give exactly the gradient of the reported
    aux_loss + z_loss values (checked by central differences on those values)."""
    r = np.random.default_rng(2)
    x = r.standard_normal((7, 5))
    router = r.standard_normal((4, 5))
    w1, w2 = r.standard_normal((4, 5, 3)), r.standard_normal((4, 3, 5))

    def aux_value(x_, router_):
        stats = {}
        with mc.no_grad():
            ops.moe(
                mc.Tensor(x_),
                mc.Tensor(router_),
                mc.Tensor(w1),
                mc.Tensor(w2),
                k=2,
                score=score,
                aux_loss=0.3,
                z_loss=0.05,
                stats=stats,
            )
        return stats["aux_loss"] + stats["z_loss"]

    rt = mc.Tensor(router.copy(), requires_grad=True)
    xt = mc.Tensor(x.copy(), requires_grad=True)
    y = ops.moe(xt, rt, mc.Tensor(w1), mc.Tensor(w2), k=2, score=score, aux_loss=0.3, z_loss=0.05)
    y.backward(np.zeros_like(y.data))
    for target, analytic, which in ((router, rt.grad, "router"), (x, xt.grad, "x")):
        numeric = np.zeros_like(target)
        for i in np.ndindex(target.shape):
            plus, minus = target.copy(), target.copy()
            plus[i] += 1e-6
            minus[i] -= 1e-6
            args_p = (x, plus) if which == "router" else (plus, router)
            args_m = (x, minus) if which == "router" else (minus, router)
            numeric[i] = (aux_value(*args_p) - aux_value(*args_m)) / 2e-6
        np.testing.assert_allclose(analytic, numeric, atol=1e-6, rtol=1e-4)


def test_aux_loss_values_match_the_switch_formula():
    x, router, w1, w2 = layer_inputs(32, 8, 4, 6, dtype=np.float64, seed=3)
    stats = {}
    ops.moe(
        mc.Tensor(x),
        mc.Tensor(router),
        mc.Tensor(w1),
        mc.Tensor(w2),
        k=2,
        aux_loss=0.01,
        z_loss=0.001,
        stats=stats,
    )
    logits = x @ router.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top2 = np.argsort(-p, axis=1, kind="stable")[:, :2]
    f = np.bincount(top2.ravel(), minlength=4) / (32 * 2)
    assert stats["aux_loss"] == pytest.approx(0.01 * 4 * (f * p.mean(0)).sum(), rel=1e-10)
    lse = np.log(np.exp(logits).sum(1))
    assert stats["z_loss"] == pytest.approx(0.001 * (lse**2).mean(), rel=1e-10)


def test_moe_module_shared_experts_and_stats():
    mc.manual_seed(0)
    layer = nn.MoE(8, 6, n_experts=4, top_k=2, n_shared_experts=2)
    x = mc.randn(3, 5, 8)
    y = layer(x)
    routed = ops.moe(x, layer.router, layer.w1, layer.w2, k=2)
    shared = layer.shared_out(ops.gelu(layer.shared_in(x)))
    np.testing.assert_allclose(y.data, routed.data + shared.data, rtol=1e-5, atol=1e-6)
    s = layer.last_stats
    assert sum(s["tokens_per_expert"]) == 15 * 2 and s["dropped"] == 0
    assert s["min"] <= s["max"] and s["cv"] >= 0 and 0 <= s["dead"] <= 4
    y.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    names = {n for n, _ in layer.named_parameters()}
    assert {"router", "w1", "w2", "shared_in.weight", "shared_out.weight"} <= names
    assert "expert_bias" in layer.state_dict()


def test_aux_loss_free_bias_balances_load():
    mc.manual_seed(0)
    # PyTorch's router scale (U(±1/sqrt(8))): the bias steps of 0.05 are small against its
    # logits; under the N(0, 0.02²) default they would swamp them and the load oscillates.
    layer = nn.MoE(
        8,
        4,
        n_experts=4,
        top_k=1,
        score="sigmoid",
        aux_loss=0.0,
        bias_update_rate=0.05,
        init="torch",
    )
    layer.router.data[0] += 1.0  # with inputs of positive mean, expert 0 wins at first
    x = mc.Tensor(mc.randn(256, 8).numpy() + 1.0)
    layer(x)
    first = layer.last_stats["tokens_per_expert"].copy()
    for _ in range(60):
        layer(x)
        layer.update_bias()
    last = layer.last_stats["tokens_per_expert"]
    assert first.max() > 150  # badly imbalanced before
    assert last.max() < first.max() and layer.expert_bias[0] < 0
    assert np.std(last) < np.std(first)


def test_moe_rejects_bad_configuration():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, n_experts=4\]"):
        nn.MoE(8, 4, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="activation"):
        nn.MoE(8, 4, n_experts=4, activation="tanh")
    with pytest.raises(ValueError, match="n_groups"):
        nn.MoE(8, 4, n_experts=4, n_groups=3, topk_groups=1)
    layer = nn.MoE(8, 4, n_experts=4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(mc.randn(2, 7))


def test_zero_tokens_and_eval_mode():
    layer = nn.MoE(8, 4, n_experts=4).eval()
    y = layer(mc.zeros(0, 8))
    assert y.shape == (0, 8)
    assert layer.last_stats["dead"] == 4


def test_aux_loss_scale_is_each_layers_own():
    """Two stacked layers with ``aux_loss_scale`` 0.25 and 2: with zero upstream gradient,
    backward gives the gradient of 0.25·(aux + z of the first) + 2·(aux + z of the second)
    from the reported values, by central differences — the second layer's losses reach the
    first router through the first layer's output, with the second layer's scale."""
    mc.manual_seed(5)
    common = dict(n_experts=4, top_k=2, dtype=np.float64, init="torch")
    first = nn.MoE(5, 3, aux_loss=0.3, z_loss=0.05, **common)
    second = nn.MoE(5, 3, score="sigmoid", aux_loss=0.2, z_loss=0.02, **common)
    first.aux_loss_scale, second.aux_loss_scale = 0.25, 2.0
    x = np.random.default_rng(4).standard_normal((9, 5))

    def objective():
        with mc.no_grad():
            second(first(mc.Tensor(x)))
        return sum(
            m.aux_loss_scale * (m.last_stats["aux_loss"] + m.last_stats["z_loss"])
            for m in (first, second)
        )

    y = second(first(mc.Tensor(x)))
    y.backward(np.zeros_like(y.data))
    for layer in (first, second):
        router = layer.router.data
        numeric = np.zeros_like(router)
        for i in np.ndindex(router.shape):
            keep = router[i]
            router[i] = keep + 1e-6
            plus = objective()
            router[i] = keep - 1e-6
            minus = objective()
            router[i] = keep
            numeric[i] = (plus - minus) / 2e-6
        np.testing.assert_allclose(layer.router.grad, numeric, atol=1e-6, rtol=1e-4)
    # Scale 1 (the default) would give other gradients: the check above can tell.
    assert np.abs(first.router.grad).max() > 1e-3
