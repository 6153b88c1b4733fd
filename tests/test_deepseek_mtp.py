"""Multi-token prediction: the loss against a hand-built reference of the V3 formula, a
gradcheck through the MTP modules, and speculative decoding equal to greedy decoding."""

from __future__ import annotations

import re

import numpy as np
import pytest

import moecore as mc
from moecore import ops
from moecore.autograd import gradcheck
from moecore.models import ModelConfig, MoETransformer
from moecore.models import mtp as mtp_module
from moecore.train import generate as gen
from moecore.train.config import build_config
from moecore.train.generate import generate_ids


def tiny(depth=2, **kw):
    overrides = {"mtp_depth": depth, "seq_len": 16, **kw}
    cfg = ModelConfig.from_run(build_config("deepseek-tiny", overrides=overrides))
    mc.manual_seed(0)
    return MoETransformer(cfg)


def ce(logits, targets):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, targets[..., None], -1).mean())


def test_mtp_loss_is_main_plus_lambda_over_d_times_the_depth_losses():
    model = tiny(depth=2, mtp_weight=0.4)
    model.train()
    ids = np.random.default_rng(0).integers(0, 256, (2, 13))
    x, y = ids[:, :-1], ids[:, 1:]
    loss = model(x, y).item()
    # reference: each depth by hand from the modules, V3-TR eq. (21)-(25)
    with mc.no_grad():
        h = model.hidden_states(x)
        main = ce(ops.linear(model.norm(h), model.tok_emb.weight).data.astype(np.float64), y)
        t, depth_losses = x.shape[1], []
        for k, module in enumerate(model.mtp, start=1):
            joined = ops.concat(
                [module.hidden_norm(h[:, : t - k]), module.embed_norm(model.tok_emb(x[:, k:]))],
                axis=-1,
            )
            h = module.block(module.proj(joined))
            logits = ops.linear(module.norm(h), model.tok_emb.weight).data.astype(np.float64)
            depth_losses.append(ce(logits, y[:, k:]))
    assert model.last_mtp_losses == pytest.approx(depth_losses, rel=1e-5)
    assert loss == pytest.approx(main + 0.4 / 2 * sum(depth_losses), rel=1e-5)
    # evaluation reports the main loss only (comparable with a model without MTP)
    model.eval()
    assert model(x, y).item() == pytest.approx(main, rel=1e-5)


def test_mtp_gradcheck():
    model = tiny(depth=2, attention="mha", d_model=8, n_heads=2, d_ff=8, vocab_size=32)
    model.to(dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, 32, (1, 6))
    x, y = ids[:, :-1], ids[:, 1:]
    model.train()
    h0 = mc.Tensor(np.random.default_rng(2).standard_normal((1, 5, 8)), requires_grad=True)
    params = [p for n, p in model.named_parameters() if n.startswith("mtp.")]
    params += [model.tok_emb.weight]

    def total(h, *p):
        extra = mtp_module.mtp_losses(model, h, x, y)
        return (extra[0] + extra[1]).reshape(1)

    # the balance losses inject gradients outside the output: off for the check
    for layer in model.moe_layers():
        layer.seq_aux_loss = layer.aux_loss = 0.0
    assert gradcheck(total, [h0, *params], atol=1e-5, rtol=1e-3)


def test_speculative_decoding_equals_greedy_whatever_the_drafts(monkeypatch):
    model = tiny(depth=2)
    greedy = generate_ids(model, [5, 6, 7], 30, temperature=0)
    stats = {}
    spec = generate_ids(model, [5, 6, 7], 30, temperature=0, speculative=True, stats=stats)
    assert spec == greedy  # crossing seq_len = 16: the last steps are plain
    assert stats["drafted"] > 0 and stats["forwards"] < 30 + 1

    # oracle drafts (the greedy continuation itself): every draft accepted, D + 1 tokens
    # per forward while the window has room
    truth = [5, 6, 7, *greedy]

    def oracle(model_, h, ids):
        return truth[len(ids) : len(ids) + model_.config.mtp_depth]

    monkeypatch.setattr(gen, "mtp_drafts", oracle)
    stats = {}
    assert (
        generate_ids(model, [5, 6, 7], 12, temperature=0, speculative=True, stats=stats)
        == (greedy[:12])
    )
    assert stats["accept_rate"] == 1.0 and stats["forwards"] == 5  # 1 + 3 + 3 + 3 + 2

    # adversarial drafts (always wrong): nothing accepted, output unchanged
    monkeypatch.setattr(gen, "mtp_drafts", lambda m, h, ids: [(truth[len(ids)] + 1) % 256] * 2)
    stats = {}
    assert (
        generate_ids(model, [5, 6, 7], 12, temperature=0, speculative=True, stats=stats)
        == (greedy[:12])
    )
    assert stats["accepted"] == 0 and stats["forwards"] == 12


def test_speculative_needs_greedy_and_mtp():
    with pytest.raises(ValueError, match="greedy"):
        generate_ids(tiny(depth=1), [1], 3, temperature=0.5, speculative=True)
    with pytest.raises(ValueError, match="mtp_depth"):
        generate_ids(tiny(depth=0), [1], 3, temperature=0, speculative=True)


def test_cli_train_deepseek_tiny_then_speculative_generate(tmp_path, corpus, capsys):
    from moecore.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "deepseek-tiny", "--data", str(corpus), "--out", str(out)]
    assert main([*args, "--set", "steps=3", "eval_every=0", "seq_len=32"]) == 0
    capsys.readouterr()
    gen_args = ["generate", "--run", str(out), "--prompt", "def ", "--tokens", "20"]
    assert main([*gen_args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*gen_args, "--temperature", "0", "--speculative"]) == 0
    captured = capsys.readouterr()
    assert captured.out == greedy
    assert re.search(r"speculative decoding: \d+/\d+ MTP drafts accepted \(rate", captured.err)
    assert main([*gen_args, "--speculative"]) == 2  # sampling: refused
    assert "greedy" in capsys.readouterr().err
