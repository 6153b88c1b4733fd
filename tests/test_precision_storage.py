"""Real bf16 storage in training: a bf16 run's weights' compute copies and activations are
``ml_dtypes.bfloat16`` arrays between ops, the islands (norm statistics, router, logits,
loss) and parameter gradients float32; and such a run follows the emulated one (float32
arrays holding bf16 values) step by step."""

import io

import ml_dtypes
import numpy as np
import pytest

import moecore
from moecore import nn, ops
from moecore.autograd.primitives.matmul import Linear as LinearFn
from moecore.kernels.lowp import unit_roundoff
from moecore.models.transformer import Block
from moecore.nn.precision import StoreAs
from moecore.ops.attention import PackedCausalAttention
from moecore.ops.moe import MoEFunction
from moecore.ops.norm import NormFn
from moecore.train import Trainer, build_config
from moecore.train import precision as run_precision
from moecore.train.metrics import read_metrics
from moecore.train.trainer import build_model

BF16 = np.dtype(ml_dtypes.bfloat16)
U = unit_roundoff(BF16)  # 2⁻⁸
F32_EPS = 2.0**-24


def _bf16(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(BF16)


def test_linear_on_bf16_arrays_against_float64():
    """bf16 x and w: y bf16, dx bf16, dw float32, each within one bf16 rounding (dw: none)
    plus float32 summation over the reduction length of the float64 reference."""
    rng = np.random.default_rng(0)
    t, n_in, n_out = 96, 48, 40
    x0 = moecore.Tensor(_bf16(rng, 2, t // 2, n_in).astype(np.float32), requires_grad=True)
    x = StoreAs.apply(x0, BF16)  # a bf16 activation (not a leaf)
    w = nn.Parameter(rng.standard_normal((n_out, n_in)).astype(np.float32))
    w.data = w.data.astype(BF16)  # a compute copy, as MasterWeights swaps it in
    y = ops.linear(x, w)
    assert y.dtype == BF16 and y.shape == (2, t // 2, n_out)
    g = _bf16(rng, 2, t // 2, n_out)
    y.backward(g)
    x64, w64, g64 = (a.astype(np.float64).reshape(-1, a.shape[-1]) for a in (x.data, w.data, g))

    def close(got, ref, terms, k, rounded):
        bound = (U * np.abs(ref) if rounded else 0) + 2 * k * F32_EPS * terms + 1e-30
        assert np.all(np.abs(got.astype(np.float64) - ref) <= bound)

    close(y.data.reshape(-1, n_out), x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, n_in, True)
    # dx came back in bf16 (StoreAs widened it for the float32 leaf: bf16 values)
    dx = x0.grad
    np.testing.assert_array_equal(dx, dx.astype(BF16).astype(np.float32))
    close(dx.reshape(-1, n_in), g64 @ w64, np.abs(g64) @ np.abs(w64), n_out, True)
    assert w.grad.dtype == np.float32  # the master's gradient
    close(w.grad, g64.T @ x64, np.abs(g64).T @ np.abs(x64), t, False)


def test_linear_with_mixed_operands_computes_in_float32():
    """A float32 island's output times a bf16 weight (the output layer): float32 logits,
    the product of the exact (widened) operands."""
    rng = np.random.default_rng(1)
    x = moecore.Tensor(rng.standard_normal((5, 8)).astype(np.float32), requires_grad=True)
    w = nn.Parameter(rng.standard_normal((3, 8)).astype(np.float32))
    w.data = w.data.astype(BF16)
    y = ops.linear(x, w)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.data, x.data @ w.data.astype(np.float32).T, rtol=1e-6)
    y.sum().backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32
    np.testing.assert_allclose(w.grad, np.ones((5, 3), np.float32).T @ x.data, rtol=1e-6)


def _precision(model, dtype="bf16"):
    config = build_config("moe-tiny", overrides={"dtype": dtype})
    return run_precision.RunPrecision(model, config, residual=(Block,))


def _graph(loss):
    seen, stack, out = set(), [loss._ctx], []
    while stack:
        ctx = stack.pop()
        if ctx is None or id(ctx) in seen:
            continue
        seen.add(id(ctx))
        out.append(ctx)
        stack.extend(p._ctx for p in ctx.parents if p is not None)
    return out


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_on_bf16_arrays_against_float64(approximate):
    """GELU and its gradient of bf16 x: computed in float32 and rounded once, so within
    u·|ref| plus float32's (and the erf approximation's, 1.5e-7) error of the reference."""
    rng = np.random.default_rng(2)
    x0 = moecore.Tensor(_bf16(rng, 64, 40, scale=3).astype(np.float32), requires_grad=True)
    x = StoreAs.apply(x0, BF16)
    y = ops.gelu(x, approximate=approximate)
    assert y.dtype == BF16
    g = _bf16(rng, 64, 40)
    y.backward(g)
    xd, gd = x.data.astype(np.float64), g.astype(np.float64)
    if approximate == "tanh":
        inner = np.sqrt(2 / np.pi) * (xd + 0.044715 * xd**3)
        t = np.tanh(inner)
        ref = 0.5 * xd * (1 + t)
        dref = gd * (
            0.5 * (1 + t) + 0.5 * xd * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * xd**2)
        )
    else:
        from scipy.special import erf

        cdf = 0.5 * (1 + erf(xd / np.sqrt(2)))
        ref = xd * cdf
        dref = gd * (cdf + xd * np.exp(-0.5 * xd**2) / np.sqrt(2 * np.pi))
    slack = 64 * F32_EPS + 1e-6
    assert np.all(
        np.abs(y.data.astype(np.float64) - ref) <= U * np.abs(ref) + slack * (1 + np.abs(xd))
    )
    got = x0.grad.astype(np.float64)
    assert np.all(
        np.abs(got - dref) <= U * np.abs(dref) + slack * (1 + np.abs(xd)) * (1 + np.abs(gd))
    )


SHAPES = {
    "moe-tiny": {},
    # a dense first layer (GELU on bf16), RMSNorm and rotary embeddings
    "dense-rope-rmsnorm": {"first_dense_layers": 1, "norm": "rmsnorm", "position": "rope"},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_bf16_step_stores_weights_and_activations_in_bf16(shape):
    moecore.manual_seed(0)
    cfg = build_config("moe-tiny", overrides=SHAPES[shape])
    model = build_model(cfg)
    model.train()
    prec = _precision(model)
    assert prec.storage
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.seq_len))
    with prec.compute():
        loss = model(ids, np.roll(ids, -1, axis=1))
        assert loss.dtype == np.float32
        graph = _graph(loss)
        kinds = {}
        for ctx in graph:
            kinds.setdefault(ctx.fn, []).append(ctx)
        # the GEMMs, attention and the MoE layer read bf16 activations and bf16 weights
        for fn in (PackedCausalAttention, MoEFunction):
            assert all(c.parents[0].dtype == BF16 for c in kinds[fn])
        moe = model.moe_layers()[0]
        assert moe.w1.data.dtype == BF16 and moe.router.data.dtype == np.float32
        linears = kinds[LinearFn]
        head = [c for c in linears if c.parents[1] is model.tok_emb.weight]
        assert len(head) == 1 and head[0].parents[0].dtype == np.float32  # float32 logits
        assert all(c.parents[0].dtype == BF16 for c in linears if c not in head)
        assert all(c.parents[1].dtype == BF16 for c in linears)
        # norms read the bf16 residual stream, with float32 parameters
        norms = kinds[NormFn]
        assert all(c.parents[0].dtype == BF16 for c in norms)
        assert all(c.parents[1].dtype == np.float32 for c in norms)
        # what backward keeps: bf16 activations; the router's probabilities float32
        for c in linears:
            assert all(a.dtype == (c.parents[0].dtype) for a in c._saved[:1])
        for c in kinds[MoEFunction]:
            x2, _, _, _, _, weights, probs, x_exp, _, _, h, _, a, y_sorted = c._saved
            assert all(v.dtype == BF16 for v in (x2, x_exp, h, a, y_sorted))
            assert probs.dtype == weights.dtype == np.float32
        loss.backward()
    # parameter gradients float32 for the float32 masters, which are back in place
    for p in model.parameters():
        assert p.data.dtype == np.float32
        assert p.grad is not None and p.grad.dtype == np.float32
        assert np.all(np.isfinite(p.grad))


def _losses(tmp_path, corpus, name, storage, monkeypatch):
    monkeypatch.setattr(run_precision, "stores_bf16", lambda config: storage)
    overrides = {"dtype": "bf16", "steps": 20, "eval_every": 20, "data": str(corpus)}
    out = tmp_path / name
    Trainer(build_config("moe-tiny", overrides=overrides), out, out=io.StringIO()).train()
    records = read_metrics(out / "metrics.jsonl")
    return np.array([r["loss"] for r in records if "loss" in r and "step" in r])


def test_real_bf16_storage_follows_the_emulated_run(tmp_path, corpus, monkeypatch):
    """The same 20 steps with real bf16 arrays and with float32 arrays rounded to bf16.
    They differ only where real storage rounds a value the emulation keeps in float32 (the
    residual sum inside a block, a bias added after the product) — each a relative change
    of at most u = 2⁻⁸ in one tensor — so the loss may move by a small fraction of one
    rounding of the loss itself: the bound is u/2·|loss| per step (about 0.01 at loss 5;
    measured: at most 5·10⁻⁴)."""
    real = _losses(tmp_path, corpus, "real", True, monkeypatch)
    emulated = _losses(tmp_path, corpus, "emulated", False, monkeypatch)
    assert len(real) == len(emulated) == 20
    diff = np.abs(real - emulated)
    assert np.all(diff <= U / 2 * np.abs(emulated)), diff
    # not the same computation (real storage rounds more), and not a different run either
    assert np.any(diff > 0)
    assert real[-1] < real[0] - 0.3


@pytest.mark.parametrize("dtype", ["fp16", "fp8"])
def test_other_formats_keep_float32_arrays(dtype):
    model = build_model(build_config("moe-tiny"))
    prec = _precision(model, dtype)
    assert not prec.storage
    with prec.compute():
        assert all(p.data.dtype == np.float32 for p in model.parameters())
