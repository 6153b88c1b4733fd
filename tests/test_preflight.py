"""Memory pre-flight: the parameter count behind the estimate equals the model's; an
impossible setting (``seq_len=100000``) is refused before training with the keys that drive
it; ``memory_limit_gb`` overrides what the machine says; a cgroup limit lower than
MemAvailable is the one used; the estimate is printed with the configuration."""

import io
import subprocess
import sys

import pytest

from moecore.train import ConfigError, Trainer, build_config, build_model
from moecore.train.preflight import available_memory, check_memory, count_parameters, estimate


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation": "swiglu", "norm": "rmsnorm", "position": "rope", "n_shared_experts": 1},
        {"first_dense_layers": 1, "moe_every": 2, "n_layers": 4, "vocab_size": 300},
        {"bias": True, "activation": "swiglu"},
    ],
)
def test_parameter_count_equals_the_models(overrides):
    config = build_config("moe-tiny", overrides=overrides)
    model = build_model(config)
    total, experts = count_parameters(config)
    assert total == model.num_parameters()
    expert_tensors = [
        t for layer in model.moe_layers() for t in (layer.w1, layer.w2, layer.b1, layer.b2)
    ]
    assert experts == sum(t.numel() for t in expert_tensors if t is not None)


def test_seq_len_100000_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moecore.cli", "train", "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--set", "seq_len=100000"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "estimated peak memory" in done.stderr and "seq_len²" in done.stderr, done.stderr
    assert "memory_limit_gb" in done.stderr, done.stderr
    assert not (out / "metrics.jsonl").exists()  # nothing started


def test_memory_limit_gb_overrides_what_the_machine_says():
    huge = build_config("moe-small", overrides={"seq_len": 100_000})
    est, problem = check_memory(huge)
    assert problem is not None and est.attention > 10 * 2**40  # 16 × 4 × 1e10 × 4 B × 5
    allowed = build_config("moe-small", overrides={"seq_len": 100_000, "memory_limit_gb": 1e6})
    assert check_memory(allowed)[1] is None
    small = build_config("moe-tiny", overrides={"memory_limit_gb": 0.01})
    with pytest.raises(ConfigError, match=r"exceeds the 10 MiB available \(memory_limit_gb\)"):
        Trainer(small, "unused-run-dir", out=io.StringIO())


def test_a_lower_cgroup_limit_is_what_is_available(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text(f"{3 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{1 << 30}\n")
    monkeypatch.setenv("MOECORE_CGROUP_ROOT", str(tmp_path))
    assert available_memory() == (2 << 30, f"cgroup limit {tmp_path / 'memory.max'}")
    (tmp_path / "memory.max").write_text("max\n")
    found = available_memory()
    assert found is not None and found[1] == "MemAvailable in /proc/meminfo"


def test_estimate_grows_as_the_keys_it_names(tmp_path):
    base = estimate(build_config("moe-tiny"))
    longer = estimate(build_config("moe-tiny", overrides={"seq_len": 128}))
    assert longer.attention == 4 * base.attention  # seq_len²
    assert longer.activations == 2 * base.activations
    split = estimate(build_config("moe-tiny", overrides={"ep": 2, "dp": 2}), world_size=4)
    assert split.activations == base.activations // 4  # batch_size 4 over 4 ranks: 1 row each
    assert split.parameters < base.parameters  # half of each layer's experts


def test_estimate_divides_what_zero_shards():
    # By hand from the model's own count: stage 1 shards AdamW's moments, 2 the gradients
    # too, 3 the parameters too; replicated elements over the world, an expert's over the
    # ranks holding it (dp).
    c = build_config("moe-tiny", overrides={"dp": 2})
    total, experts = count_parameters(c)
    half = -(-total // 2) * 4
    plain = estimate(c, world_size=2)
    for stage, want in {
        1: (4 * total, 4 * total, 2 * half),
        2: (4 * total, half, 2 * half),
    }.items():
        est = estimate(build_config("moe-tiny", overrides={"dp": 2, "zero": stage}), 2)
        assert (est.parameters, est.gradients, est.optimizer) == want, stage
        assert est.activations == plain.activations
    est = estimate(build_config("moe-tiny", overrides={"dp": 2, "zero": 3}), 2)
    assert (est.parameters, est.gradients, est.optimizer) == (half, half, 2 * half)
    mesh = build_config("moe-tiny", overrides={"dp": 2, "ep": 2, "zero": 2})
    mine = -(-(total - experts) // 4) + -(-(experts // 2) // 2)
    assert estimate(mesh, world_size=4).gradients == 4 * mine


def test_estimate_is_printed_with_the_configuration(tmp_path):
    config = build_config("moe-tiny", overrides={"steps": 1, "eval_every": 0, "seq_len": 32})
    out = io.StringIO()
    Trainer(config, tmp_path / "run", out=out).train()
    assert "memory ~" in out.getvalue() and "peak estimated" in out.getvalue(), out.getvalue()
