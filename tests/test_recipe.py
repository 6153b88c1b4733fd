"""The training recipe: GPT-2 initialisation (and PyTorch's on request), and the fixed
validation set of ``moecore eval --windows`` against an independent numpy computation."""

import io
import json
import math

import numpy as np
import pytest
from corpora import write_stdlib_corpus

import moecore
from moecore import nn
from moecore.cli import main
from moecore.models import ModelConfig, MoETransformer
from moecore.train import ConfigError, Trainer, build_config


def small_model(init: str) -> MoETransformer:
    moecore.manual_seed(0)
    cfg = ModelConfig(d_model=128, n_layers=3, n_heads=2, seq_len=32, d_ff=256, init=init)
    return MoETransformer(cfg)


def test_gpt2_init_is_the_default():
    model = small_model("gpt2")
    assert ModelConfig().init == "gpt2"
    residual = 0.02 / math.sqrt(2 * 3)
    for name, p in model.named_parameters():
        w = p.data
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            np.testing.assert_array_equal(w, 1.0)
        elif name.endswith("bias"):
            np.testing.assert_array_equal(w, 0.0)
        else:
            std = residual if name.endswith(("attn.proj.weight", "ffn.w2")) else 0.02
            assert abs(w.mean()) < 0.1 * std, name
            assert w.std() == pytest.approx(std, rel=0.03), name


def test_torch_init_is_fan_in_uniform():
    model = small_model("torch")
    block = model.blocks[0]
    for w, fan_in in (
        (block.attn.qkv.weight.data, 128),
        (block.attn.proj.weight.data, 128),
        (block.ffn.router.data, 128),
        (block.ffn.w1.data, 128),
        (block.ffn.w2.data, 256),
    ):
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(w).max() <= bound
        # U(-b, b) has std b/sqrt(3)
        assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    # The embedding keeps its 0.02 (tied to the output layer) whatever the scheme.
    assert model.tok_emb.weight.data.std() == pytest.approx(0.02, rel=0.05)


def test_layers_take_the_init_option():
    moecore.manual_seed(0)
    lin = nn.Linear(300, 200, init="torch")
    assert np.abs(lin.bias.data).max() > 0  # PyTorch draws biases too
    assert nn.Linear(300, 200).bias.data.tolist() == [0.0] * 200
    assert nn.Embedding(500, 64).weight.data.std() == pytest.approx(0.02, rel=0.05)
    assert nn.Embedding(500, 64, init="torch").weight.data.std() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="init must be one of"):
        nn.Linear(3, 2, init="xavier")
    with pytest.raises(ValueError, match="init must be one of"):
        nn.MoE(8, 8, 2, init="xavier")
    with pytest.raises(ConfigError, match="init must be one of"):
        build_config(overrides={"init": "xavier"})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_stdlib_corpus(
        tmp_path_factory.mktemp("data"), 300_001
    )  # not a multiple of 20: n // 20 must be exact


def reference_loss(model, tokens: np.ndarray, n_windows: int, seq_len: int) -> float:
    """The issue's set, computed directly: numpy log-softmax over the model's logits."""
    n = len(tokens)
    val = tokens[n - n // 20 :]
    stride = (len(val) - (seq_len + 1)) // (n_windows - 1)
    wins = np.stack([val[j * stride : j * stride + seq_len + 1] for j in range(n_windows)])
    batch_losses = []
    model.eval()
    for b in range(0, n_windows, 16):
        chunk = wins[b : b + 16].astype(np.int64)
        with moecore.no_grad():
            logits = model(chunk[:, :-1]).data.astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        target = chunk[:, 1:]
        nll = -np.take_along_axis(logp, target[..., None], axis=-1)
        batch_losses.append(nll.mean())
    return float(np.mean(batch_losses))


def test_eval_windows_matches_a_numpy_reference(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    overrides = {"steps": 3, "eval_every": 0, "seq_len": 32, "data": str(corpus)}
    Trainer(build_config("moe-tiny", overrides=overrides), out, out=io.StringIO()).train()
    assert main(["eval", "--run", str(out), "--windows", "40"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["windows"] == 40 and printed["step"] == 3
    from moecore.cli import _load_run

    model, _, _ = _load_run(str(out))
    tokens = np.frombuffer(corpus.read_bytes(), np.uint8)
    expected = reference_loss(model, tokens, 40, 32)
    assert printed["val_loss"] == pytest.approx(expected, rel=1e-5)
    # Not the run's own validation batches, nor the first windows of the split.
    assert main(["eval", "--run", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] != printed["val_loss"]
    assert main(["eval", "--run", str(out), "--windows", "0"]) == 2
    assert "number of windows must be ≥ 1" in capsys.readouterr().err


def test_moe_32_preset_and_its_documented_size():
    cfg = build_config("moe-32")
    assert (cfg.n_experts, cfg.top_k, cfg.aux_loss) == (32, 2, 0.01)
    model = MoETransformer(ModelConfig.from_run(cfg))
    d, f, e, L, v, t = (
        cfg.d_model,
        cfg.d_ff,
        cfg.n_experts,
        cfg.n_layers,
        cfg.vocab_size,
        cfg.seq_len,
    )
    per_layer_dense = 4 * d * d + 4 * d + e * d  # attention, two LayerNorms, router
    expert = 2 * d * f
    total = v * d + t * d + L * (per_layer_dense + e * expert) + 2 * d
    assert model.num_parameters() == total == 17_994_240  # docs/recipe.md
    active = total - L * (e - cfg.top_k) * expert
    assert active == 2_265_600


def test_expert_biases_forward_and_gradients():
    """ops.moe with b1/b2 against a per-token loop, and its gradients (every input, biases
    included) against central differences, with each activation and capacity dropping."""
    from moecore import ops
    from moecore.autograd import gradcheck

    r = np.random.default_rng(3)
    x, router = r.standard_normal((7, 6)), r.standard_normal((4, 6))
    w1, w2 = r.standard_normal((4, 6, 5)), r.standard_normal((4, 5, 6))
    b1, b2 = r.standard_normal((4, 5)), r.standard_normal((4, 6))
    y = ops.moe(*(moecore.Tensor(a) for a in (x, router, w1, w2)), k=2, b1=b1, b2=b2)
    expected = np.zeros_like(x)
    for i in range(len(x)):
        logits = router @ x[i]
        p = np.exp(logits - logits.max())
        top = np.argsort(-p)[:2]
        for e in top:
            h = x[i] @ w1[e] + b1[e]
            a = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
            expected[i] += p[e] / p[top].sum() * (a @ w2[e] + b2[e])
    np.testing.assert_allclose(y.data, expected, rtol=1e-10, atol=1e-10)

    def t64(*s):
        return moecore.Tensor(r.standard_normal(s), requires_grad=True)

    for kw in (
        dict(k=2),
        dict(k=2, activation="swiglu"),
        dict(k=1, activation="relu"),
        dict(k=2, capacity_factor=0.5),
    ):
        gate = 2 if kw.get("activation") == "swiglu" else 1
        inputs = [t64(2, 5, 6), t64(4, 6), t64(4, 6, gate * 3), t64(4, 3, 6)]
        inputs += [t64(4, gate * 3), t64(4, 6)]

        def f(x, rw, w1, w2, b1, b2, kw=kw):
            return ops.moe(x, rw, w1, w2, b1=b1, b2=b2, **kw)

        assert gradcheck(f, inputs), kw


def test_bias_option_adds_the_reference_parameters():
    cfg = build_config(overrides={"bias": True})
    model = MoETransformer(ModelConfig.from_run(cfg))
    assert model.num_parameters() == 9_609_728  # the reference implementation's 9.61 M
    ffn, attn = model.blocks[0].ffn, model.blocks[0].attn
    assert ffn.b1.shape == (8, 512) and ffn.b2.shape == (8, 256)
    assert not ffn.b1.data.any() and not attn.qkv.bias.data.any()
    with pytest.raises(ConfigError, match="bias with ep"):
        build_config(overrides={"bias": True, "ep": 2})
    with pytest.raises(ValueError, match="expert biases"):
        from moecore.distributed import SingleProcess
        from moecore.distributed.expert_parallel import ExpertParallelMoE

        ExpertParallelMoE.from_moe(ffn, SingleProcess())
