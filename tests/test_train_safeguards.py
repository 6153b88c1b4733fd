"""The training loop's safeguards, each selected by a configuration key: the optimizer
choice, adaptive gradient clipping, loss-spike skipping, gradient accumulation, and the
router metrics of every step (each checked against an independent computation)."""

import io
import math

import numpy as np
import pytest
from corpora import write_stdlib_corpus

import moecore
from moecore import optim
from moecore.data import load_corpus, train_batch
from moecore.optim.agc import adaptive_clip_grad_
from moecore.train import ConfigError, Trainer, build_config, build_model
from moecore.train.metrics import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_stdlib_corpus(tmp_path_factory.mktemp("data"), 200_000)


def tiny(corpus, **extra):
    base = {
        "seq_len": 32,
        "batch_size": 4,
        "eval_every": 0,
        "checkpoint_every": 0,
        "schedule": "constant",
        "warmup_steps": 0,
        "data": str(corpus),
    }
    return build_config("moe-tiny", overrides={**base, **extra})


def params(model):
    return {n: p.data.copy() for n, p in model.named_parameters()}


def one_step(config, tmp_path):
    """Initial parameters and those after one trainer step (and the step's record)."""
    trainer = Trainer(config, tmp_path / "run", out=io.StringIO())
    before = params(trainer.model)
    trainer.train()
    return before, params(trainer.model), read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]


def reference_grads(config, corpus, micro_batches=(0,)):
    """Gradients of a fresh model (the run's initialisation) on the step-0 rows of the
    given micro-batches taken as ONE batch, computed outside the trainer."""
    model = build_model(config)
    tokens = load_corpus(str(corpus)).train
    parts = [
        train_batch(tokens, config.seq_len, config.batch_size, config.seed, 0, m)
        for m in micro_batches
    ]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    model(x, y).backward()
    return model


# -- optimizer choice --------------------------------------------------------------------


def test_sgd_is_selected_and_takes_a_plain_gradient_step(tmp_path, corpus):
    config = tiny(corpus, steps=1, optimizer="sgd", beta1=0.0, weight_decay=0.0, clip=1e9, lr=0.1)
    before, after, record = one_step(config, tmp_path)
    ref = reference_grads(config, corpus)
    for name, p in ref.named_parameters():
        expected = before[name] - 0.1 * p.grad
        np.testing.assert_allclose(after[name], expected, rtol=1e-4, atol=1e-6, err_msg=name)
    assert record["lr"] == 0.1


def test_adafactor_is_selected(tmp_path, corpus):
    """The trainer's step equals optim.Adafactor applied by hand at the run's lr (no
    relative step, no parameter scaling), with weight decay on matrices only."""
    config = tiny(corpus, steps=1, optimizer="adafactor", clip=1e9, lr=0.01)
    _, after, _ = one_step(config, tmp_path)
    ref = reference_grads(config, corpus)
    groups = [
        {"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    optim.Adafactor(groups, lr=0.01, beta1=0.9, relative_step=False, scale_parameter=False).step()
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(after[name], p.data, rtol=1e-4, atol=1e-6, err_msg=name)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        build_config(overrides={"optimizer": "lion"})
    with pytest.raises(ConfigError, match="agc must be ≥ 0"):
        build_config(overrides={"agc": "-1"})


# -- adaptive gradient clipping ------------------------------------------------------------


def numpy_agc(w, g, factor, eps=1e-3):
    """Brock et al. 2021, unit by unit with explicit loops: units are whole vectors, rows
    of matrices, and [e, :, j] columns of [E, in, out] expert weights."""
    g = g.astype(np.float64).copy()
    if w.ndim <= 1:
        units = [(slice(None),)]
    elif w.ndim == 2:
        units = [(i, slice(None)) for i in range(w.shape[0])]
    else:
        units = [(e, slice(None), j) for e in range(w.shape[0]) for j in range(w.shape[2])]
    for u in units:
        bound = factor * max(np.linalg.norm(w[u]), eps)
        norm = np.linalg.norm(g[u])
        if norm > bound:
            g[u] *= bound / norm
    return g


def test_agc_matches_a_unitwise_numpy_reference():
    rng = np.random.default_rng(0)
    shapes = [(7,), (5, 6), (3, 4, 5)]
    ps = []
    for shape in shapes:
        p = moecore.nn.Parameter(rng.normal(size=shape).astype(np.float32))
        p.data[0] *= 1e-5  # a unit below eps: bounded by factor · eps
        p.grad = (rng.normal(size=shape) * rng.choice([0.001, 0.3], size=shape)).astype(np.float32)
        ps.append(p)
    expected = [numpy_agc(p.data, p.grad, 0.1) for p in ps]
    clipped = adaptive_clip_grad_(ps, 0.1)
    for p, e in zip(ps, expected):
        np.testing.assert_allclose(p.grad, e, rtol=1e-5, atol=1e-8)
    assert 0 < clipped < 5 + 3 * 5 + 1
    with pytest.raises(ValueError, match="clip_factor must be positive"):
        adaptive_clip_grad_(ps, 0.0)


def test_trainer_applies_agc(tmp_path, corpus):
    factor = 0.01
    config = tiny(corpus, steps=1, optimizer="sgd", beta1=0.0, weight_decay=0.0, clip=1e9, lr=1.0)
    before, after, _ = one_step(config.__class__(**{**config.to_dict(), "agc": factor}), tmp_path)
    ref = reference_grads(config, corpus)
    for name, p in ref.named_parameters():
        step = before[name].astype(np.float64) - after[name]  # lr 1: the applied gradient
        expected = numpy_agc(before[name], p.grad, factor)
        np.testing.assert_allclose(step, expected, rtol=2e-3, atol=1e-6, err_msg=name)


# -- loss spikes ---------------------------------------------------------------------------


def spiking_run(corpus, tmp_path, action):
    """16 steps; step 15's loss (and gradient) is multiplied by 10."""
    config = tiny(corpus, steps=16, spike_action=action)
    out = io.StringIO()
    trainer = Trainer(config, tmp_path / action, out=out)
    seen = {}
    forward = trainer.model.forward

    def spiking_forward(ids, targets=None):
        seen[trainer.step] = params(trainer.model)
        loss = forward(ids, targets)
        return loss * 10.0 if trainer.step == 14 else loss

    trainer.model.forward = spiking_forward
    trainer.train()
    records = read_metrics(tmp_path / action / "metrics.jsonl")
    return records, seen, out.getvalue()


def test_a_loss_spike_is_flagged_and_its_update_skipped(tmp_path, corpus):
    records, seen, text = spiking_run(corpus, tmp_path, "skip")
    assert [r["spike"] for r in records] == [False] * 14 + [True, False]
    assert [r["skipped"] for r in records] == [False] * 14 + [True, False]
    assert records[14]["loss"] > 3 * records[13]["loss"]
    for name, value in seen[14].items():  # step 15 changed no parameter
        np.testing.assert_array_equal(seen[15][name], value, err_msg=name)
    assert not np.array_equal(seen[13]["tok_emb.weight"], seen[14]["tok_emb.weight"])
    assert "loss spike (skipped)" in text


def test_spike_action_flag_only_flags(tmp_path, corpus):
    records, seen, _ = spiking_run(corpus, tmp_path, "flag")
    assert records[14]["spike"] and not records[14]["skipped"]
    assert not np.array_equal(seen[14]["tok_emb.weight"], seen[15]["tok_emb.weight"])


# -- gradient accumulation -----------------------------------------------------------------


@pytest.mark.parametrize("aux_loss", [0.0, 0.01])
def test_grad_accum_equals_one_big_batch(tmp_path, corpus, aux_loss):
    """grad_accum = 2 of batch 2 makes the update of one batch of the same 4 rows. The
    Switch aux loss is not linear in the batch (α·E·Σ fᵢ·Pᵢ, a product of two batch means):
    with it, accumulation takes the mean of the micro-batches' aux losses, not the aux loss
    of their union, and the router's gradient (mostly aux at initialisation) differs, here by
    ~26 % in layer 0 (64-token micro-batches), which reaches the layers below by ≤ 3 %."""
    common = {"steps": 1, "optimizer": "sgd", "beta1": 0.0, "weight_decay": 0.0}
    config = tiny(corpus, **common, clip=1e9, lr=1.0, aux_loss=aux_loss, grad_accum=2, batch_size=2)
    before, after, _ = one_step(config, tmp_path)
    ref = reference_grads(config, corpus, micro_batches=(0, 1))
    error = {}
    for name, p in ref.named_parameters():
        step = before[name].astype(np.float64) - after[name]
        error[name] = float(np.linalg.norm(step - p.grad) / np.linalg.norm(p.grad))
    if aux_loss == 0:
        assert max(error.values()) < 1e-4, error
    else:
        routers = {n: e for n, e in error.items() if n.endswith("router")}
        others = {n: e for n, e in error.items() if n not in routers}
        assert max(routers.values()) > 0.01, routers
        assert max(others.values()) < 0.05, others


def test_grad_accum_scales_the_injected_aux_gradients_like_the_loss(tmp_path, corpus):
    """With the aux and z losses, grad_accum = 2 makes the update of the MEAN of the two
    micro-batches' gradients, each computed alone outside the trainer (its aux losses
    injected at full weight): the trainer divides each micro-batch loss by 2 and sets every
    MoE layer's ``aux_loss_scale`` to 1/2, so the injected gradients follow."""
    common = {"steps": 1, "optimizer": "sgd", "beta1": 0.0, "weight_decay": 0.0}
    config = tiny(
        corpus, **common, clip=1e9, lr=1.0, aux_loss=0.05, z_loss=0.01, grad_accum=2, batch_size=2
    )
    before, after, _ = one_step(config, tmp_path)
    micro = [
        dict(reference_grads(config, corpus, micro_batches=(m,)).named_parameters()) for m in (0, 1)
    ]
    error = {}
    for name, p in micro[0].items():
        want = (p.grad.astype(np.float64) + micro[1][name].grad) / 2
        step = before[name].astype(np.float64) - after[name]
        error[name] = float(np.linalg.norm(step - want) / np.linalg.norm(want))
    assert max(error.values()) < 1e-4, error


# -- router metrics ------------------------------------------------------------------------


def test_metrics_carry_aux_z_entropy_and_dead_experts(tmp_path, corpus):
    """Values of layer 0 recomputed in numpy from its inputs (two micro-batches: the
    metrics are their mean); layer 1's router is zeroed so two experts get nothing."""
    config = tiny(corpus, steps=1, z_loss=0.001, grad_accum=2)
    trainer = Trainer(config, tmp_path / "run", out=io.StringIO())
    # Layer 1's router sees only zero logits: every token picks the same 2 of 4 experts.
    trainer.model.blocks[1].ffn.router.data[:] = 0.0
    inputs = []
    layer0 = trainer.model.blocks[0].ffn
    forward = layer0.forward

    def spy(x):
        inputs.append(x.data.reshape(-1, x.shape[-1]).astype(np.float64))
        return forward(x)

    layer0.forward = spy
    router = layer0.router.data.astype(np.float64).copy()
    trainer.train()
    r = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    # Independent numpy router math for layer 0, per micro-batch.
    aux, z, entropy, load = [], [], [], np.zeros(4, np.int64)
    assert len(inputs) == 2
    for x in inputs:
        logits = x @ router.T
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        probs = np.exp(logits - lse[:, None])
        top2 = np.argsort(-logits, axis=1)[:, :2]
        counts = np.bincount(top2.reshape(-1), minlength=4)
        load += counts
        aux.append(0.01 * 4 * (counts / top2.size * probs.mean(0)).sum())
        z.append(0.001 * (lse**2).mean())
        entropy.append(-(probs * np.log(probs)).sum(1).mean())
    assert r["aux_loss"][0] == pytest.approx(np.mean(aux), rel=1e-4)
    assert r["z_loss"][0] == pytest.approx(np.mean(z), rel=1e-4)
    assert r["router_entropy"][0] == pytest.approx(np.mean(entropy), rel=1e-4)
    assert r["expert_load"][0] == load.tolist()
    assert r["dead_experts"][0] == int((load == 0).sum())
    assert r["dead_experts"][1] == 2 and r["router_entropy"][1] == pytest.approx(math.log(4))
