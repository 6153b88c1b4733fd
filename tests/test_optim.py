"""Optimizers against hand-written numpy updates; schedules; clipping; state_dict."""

import math

import numpy as np
import pytest

import moecore as mc
from moecore import nn, optim


def make_params(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in [(4, 3), (3,), (70000,)]]


def grads_for(step, params, seed=1):
    rng = np.random.default_rng(seed + step)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_matches_reference_for_several_steps(dtype):
    params = make_params(dtype)
    ref = [p.data.astype(np.float64) for p in params]
    m = [np.zeros_like(r) for r in ref]
    v = [np.zeros_like(r) for r in ref]
    opt = optim.AdamW(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t in range(1, 6):
        gs = grads_for(t, params)
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        for i, g in enumerate(gs):
            g = g.astype(np.float64)
            ref[i] *= 1 - 0.01 * 0.1
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.95 * v[i] + 0.05 * g * g
            ref[i] -= 0.01 * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.95**t)) + 1e-8)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.data, r, atol=tol, rtol=tol)


def test_sgd_momentum_and_nesterov_match_reference():
    for nesterov in (False, True):
        params = make_params(np.float64)
        ref = [p.data.copy() for p in params]
        bufs = [None] * len(ref)
        opt = optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
        for t in range(1, 5):
            gs = grads_for(t, params)
            for p, g in zip(params, gs):
                p.grad = g
            opt.step()
            for i, g in enumerate(gs):
                g = g + 0.01 * ref[i]
                bufs[i] = g.copy() if bufs[i] is None else 0.9 * bufs[i] + g
                d = g + 0.9 * bufs[i] if nesterov else bufs[i]
                ref[i] = ref[i] - 0.1 * d
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p.data, r, rtol=1e-12)


def test_adafactor_factored_update_matches_reference():
    rng = np.random.default_rng(0)
    w = nn.Parameter(rng.standard_normal((5, 4)))
    b = nn.Parameter(rng.standard_normal(4))
    opt = optim.Adafactor([w, b])
    rw, rb = w.data.copy(), b.data.copy()
    row, col, vb = np.zeros(5), np.zeros(4), np.zeros(4)
    for t in range(1, 5):
        gw, gb = rng.standard_normal((5, 4)), rng.standard_normal(4)
        w.grad, b.grad = gw, gb
        opt.step()
        beta2 = 1 - t**-0.8
        rel = min(1e-2, 1 / math.sqrt(t))
        # matrix: factored second moment
        lr = rel * max(1e-3, np.sqrt(np.mean(rw**2)))
        sq = gw**2 + 1e-30
        row = beta2 * row + (1 - beta2) * sq.mean(1)
        col = beta2 * col + (1 - beta2) * sq.mean(0)
        vhat = np.outer(row, col) / row.mean()
        u = gw / np.sqrt(vhat)
        u /= max(1.0, np.sqrt(np.mean(u**2)))
        rw = rw - lr * u
        # vector: full second moment
        lr = rel * max(1e-3, np.sqrt(np.mean(rb**2)))
        vb = beta2 * vb + (1 - beta2) * (gb**2 + 1e-30)
        u = gb / np.sqrt(vb)
        u /= max(1.0, np.sqrt(np.mean(u**2)))
        rb = rb - lr * u
    np.testing.assert_allclose(w.data, rw, rtol=1e-10)
    np.testing.assert_allclose(b.data, rb, rtol=1e-10)
    assert "exp_avg_sq_row" in opt.state_dict()["state"][0]


def test_optimizer_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.AdamW([])
    with pytest.raises(ValueError, match="invalid learning rate"):
        optim.SGD(make_params(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        optim.AdamW(make_params(), betas=(1.0, 0.9))
    params = make_params()
    opt = optim.AdamW(params)
    for p in params:
        p.grad = np.ones_like(p.data)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["bogus"] = 1
    with pytest.raises(KeyError, match="unknown state keys"):
        optim.AdamW(make_params()).load_state_dict(sd)


def test_adamw_state_dict_round_trip_continues_identically():
    a_params, b_params = make_params(seed=3), make_params(seed=3)
    a = optim.AdamW(a_params, lr=0.01)
    for t in range(3):
        for p, g in zip(a_params, grads_for(t, a_params)):
            p.grad = g
        a.step()
    for pa, pb in zip(a_params, b_params):
        pb.data[...] = pa.data
    b = optim.AdamW(b_params, lr=0.01)
    b.load_state_dict(a.state_dict())
    for opt, params in ((a, a_params), (b, b_params)):
        for p, g in zip(params, grads_for(9, params)):
            p.grad = g
        opt.step()
    for pa, pb in zip(a_params, b_params):
        np.testing.assert_array_equal(pa.data, pb.data)


def test_parameter_groups_have_their_own_lr():
    w, b = make_params()[:2]
    opt = optim.SGD([{"params": [w], "lr": 0.5}, {"params": [b]}], lr=0.1)
    w.grad, b.grad = np.ones_like(w.data), np.ones_like(b.data)
    w0, b0 = w.data.copy(), b.data.copy()
    opt.step()
    np.testing.assert_allclose(w0 - w.data, 0.5, rtol=1e-6)
    np.testing.assert_allclose(b0 - b.data, 0.1, rtol=1e-6)


def test_warmup_cosine_schedule_values():
    assert optim.warmup_cosine(0, 1e-3, 50, 600, 1e-4) == pytest.approx(1e-3 / 50)
    assert optim.warmup_cosine(49, 1e-3, 50, 600, 1e-4) == pytest.approx(1e-3)
    assert optim.warmup_cosine(325, 1e-3, 50, 600, 1e-4) == pytest.approx(5.5e-4)
    assert optim.warmup_cosine(600, 1e-3, 50, 600, 1e-4) == pytest.approx(1e-4)
    params = make_params()
    opt = optim.AdamW(params, lr=1e-3)
    sched = optim.LRScheduler(opt, "linear", warmup=0, total=10, min_lr=0.0)
    for _ in range(5):
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(5e-4)


def test_clip_grad_norm():
    params = make_params(np.float64)
    for p, g in zip(params, grads_for(0, params)):
        p.grad = g
    total = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    norm = optim.clip_grad_norm_(params, 1.0)
    assert norm == pytest.approx(total)
    after = math.sqrt(sum(float((p.grad**2).sum()) for p in params))
    assert after == pytest.approx(1.0, rel=1e-5)
    params[0].grad[0, 0] = np.nan
    assert math.isnan(optim.clip_grad_norm_(params, 1.0))


def test_training_a_small_regression_reduces_loss():
    mc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16), nn.Linear(16, 1))
    opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = ((model(mc.Tensor(x)) - mc.Tensor(y)) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
