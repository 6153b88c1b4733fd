"""The main job: a tiny config trains and its loss falls; resume equals uninterrupted;
kill -9 during a checkpoint write; config validation; data errors; generate; CLI."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moecore.cli import main
from moecore.data import DataError, load_corpus
from moecore.train import CheckpointError, ConfigError, Trainer, build_config
from moecore.train import checkpoint as ckpt
from moecore.train.metrics import read_metrics

TINY = {"steps": 20, "eval_every": 10, "checkpoint_every": 10, "seq_len": 32, "batch_size": 4}


def tiny(corpus, **extra):
    return build_config("moe-tiny", overrides={**TINY, "data": str(corpus), **extra})


def run(config, out, capsys=None):
    trainer = Trainer(config, out, out=io.StringIO())
    return trainer.train()


def test_tiny_run_trains_and_loss_falls(tmp_path, corpus):
    result = run(tiny(corpus, steps=40, decay_steps=40), tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    first = np.mean([r["loss"] for r in records[:5]])
    last = np.mean([r["loss"] for r in records[-5:]])
    assert last < first - 0.5, (first, last)
    assert result.val_loss is not None and result.val_loss < records[0]["loss"]
    r = records[-1]
    for key in (
        "loss",
        "lr",
        "tokens_per_s",
        "grad_norm",
        "expert_load",
        "load_cv",
        "dropped",
        "seconds",
    ):
        assert key in r
    assert len(r["expert_load"]) == 2 and sum(r["expert_load"][0]) == 4 * 32 * 2
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == [
        "step_00000020",
        "step_00000030",
        "step_00000040",
    ]


def test_resume_equals_uninterrupted(tmp_path, corpus):
    config = tiny(corpus, dropout=0.1)
    run(config, tmp_path / "full")
    partial = build_config("moe-tiny", overrides={**config.to_dict(), "steps": 10})
    run(partial, tmp_path / "part")
    resumed = Trainer.resume(tmp_path / "part", out=io.StringIO(), overrides={"steps": 20})
    assert resumed.step == 10
    resumed.train()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["loss"] for r in part] == [r["loss"] for r in full]  # bit-exact
    assert [r.get("val_loss") for r in part] == [r.get("val_loss") for r in full]
    a, _ = ckpt.load(ckpt.latest(tmp_path / "full"))
    b, _ = ckpt.load(ckpt.latest(tmp_path / "part"))
    for name, value in a["model"].items():
        np.testing.assert_array_equal(value, b["model"][name])


def test_weights_load_with_the_safetensors_package(tmp_path, corpus):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    run(tiny(corpus, steps=2, eval_every=0), tmp_path / "run")
    path = ckpt.latest(tmp_path / "run") / "model.safetensors"
    theirs = safetensors_numpy.load_file(str(path))
    ours, _ = ckpt.load(ckpt.latest(tmp_path / "run"))
    assert set(theirs) == set(ours["model"])
    for name, value in theirs.items():
        np.testing.assert_array_equal(value, ours["model"][name])


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path, corpus):
    out = tmp_path / "run"
    run(tiny(corpus, steps=10, eval_every=0), out)
    before = ckpt.latest(out)
    env = {**os.environ, "MOECORE_CHECKPOINT_PAUSE": "30"}
    cmd = [sys.executable, "-m", "moecore.cli", "train", "--resume", str(out), "--set", "steps=12"]
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 120
        pending = out / "checkpoints"
        while time.time() < deadline and not list(pending.glob(".step_00000012.tmp-*/state.json")):
            time.sleep(0.1)
        written = list(pending.glob(".step_00000012.tmp-*/state.json"))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert written, log.read_text()
    assert ckpt.latest(out) == before
    groups, state = ckpt.load(before)
    assert state["step"] == 10 and "model" in groups
    resumed = Trainer.resume(out, out=io.StringIO(), overrides={"steps": 12})
    assert resumed.train().steps_done == 12
    assert not list(
        (out / "checkpoints").glob(".step_*")
    )  # the killed writer's temporary is cleaned


def test_resuming_a_finished_run_says_so(tmp_path, corpus, capsys):
    from moecore.cli import main

    out = tmp_path / "run"
    run(tiny(corpus, steps=2, eval_every=0), out)
    before = ckpt.latest(out)
    assert main(["train", "--resume", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"nothing to do: {out} is already at step 2" in said
    assert "nan" not in said  # it used to print "finished after 2 steps in 0 s: loss nan"
    assert ckpt.latest(out) == before  # no new checkpoint written
    assert main(["train", "--resume", str(out), "--set", "steps=3"]) == 0
    assert "finished after 3 steps" in capsys.readouterr().out


@pytest.fixture
def ctrl_c():
    """SIGINT as a terminal delivers it. A shell starts background jobs with SIGINT
    ignored, and the trainer keeps an inherited ignore (as ``nohup`` asks), so these tests
    set Python's default handler for their duration."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_step_lets_it_finish_then_saves(tmp_path, corpus, ctrl_c):
    """Ctrl-C right after the optimizer's update, before the step is counted: the step
    finishes, its metrics line is written, the checkpoint holds it, and resuming equals the
    uninterrupted run bit for bit. (A KeyboardInterrupt there saved step N's weights under
    step N−1's number: the resumed run applied step N twice.)"""
    config = tiny(corpus, steps=8, eval_every=0, checkpoint_every=1000)
    run(config, tmp_path / "full")
    trainer = Trainer(config, tmp_path / "part", out=io.StringIO())
    update = trainer.optimizer.step
    calls = 0

    def update_then_ctrl_c():
        nonlocal calls
        update()
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C

    trainer.optimizer.step = update_then_ctrl_c
    result = trainer.train()
    assert result.interrupted and result.steps_done == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    _, state = ckpt.load(ckpt.latest(tmp_path / "part"))
    assert state["step"] == 3
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == [1, 2, 3]
    Trainer.resume(tmp_path / "part", out=io.StringIO()).train()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["loss"] for r in part] == [r["loss"] for r in full]  # bit-exact


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, corpus, ctrl_c):
    """Two Ctrl-C inside one step: KeyboardInterrupt at once, nothing saved (the update may
    be half applied), the last checkpoint stays the latest."""
    config = tiny(corpus, steps=8, eval_every=0, checkpoint_every=2)
    trainer = Trainer(config, tmp_path / "run", out=io.StringIO())
    update = trainer.optimizer.step
    calls = 0

    def update_then_ctrl_c_twice():
        nonlocal calls
        update()
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    trainer.optimizer.step = update_then_ctrl_c_twice
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert ckpt.latest(tmp_path / "run").name == "step_00000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _sigint_as_default():
    """Child processes of a background job inherit SIGINT ignored; Ctrl-C tests undo that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_saves_a_checkpoint_and_exits_0(tmp_path, corpus):
    out = tmp_path / "run"
    settings = [f"{k}={v}" for k, v in {**TINY, "steps": 100_000, "eval_every": 0}.items()]
    cmd = [sys.executable, "-m", "moecore.cli", "train", "--preset", "moe-tiny", "--out", str(out)]
    cmd += ["--set", f"data={corpus}", *settings]
    log = tmp_path / "interrupted.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_sigint_as_default,
        )
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        code = proc.wait(timeout=120)
    assert code == 0, log.read_text()
    done = read_metrics(metrics)
    assert len(done) >= 3
    _, state = ckpt.load(ckpt.latest(out))
    assert state["step"] == done[-1]["step"], "the checkpoint holds the last finished step"
    resumed = Trainer.resume(out, out=io.StringIO(), overrides={"steps": state["step"] + 2})
    assert resumed.step == state["step"]
    assert resumed.train().steps_done == state["step"] + 2


def test_corrupt_checkpoint_names_the_file(tmp_path, corpus):
    out = tmp_path / "run"
    run(tiny(corpus, steps=2, eval_every=0), out)
    model_file = ckpt.latest(out) / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        Trainer.resume(out)
    (ckpt.latest(out) / "manifest.json").unlink()  # as an older moecore wrote them
    (ckpt.latest(out) / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"state\.json: corrupt JSON"):
        Trainer.resume(out)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Trainer.resume(tmp_path / "elsewhere")


def test_config_validation_lists_every_problem(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[model]\nd_model = 100\nn_heads = 3\ntop_k = 9\nbogus = 1\n[train]\nlr = "fast"\n'
    )
    with pytest.raises(ConfigError) as info:
        build_config("moe-small", toml)
    problems = info.value.problems
    assert any("unknown key 'bogus'" in p for p in problems)
    assert any("lr: expected float, got 'fast'" in p for p in problems)
    assert any("n_heads (3) must divide d_model (100)" in p for p in problems)
    assert any("top_k (9) must not exceed n_experts (8)" in p for p in problems)
    config = build_config(
        "moe-small", overrides={"steps": "50", "batch_size": "8", "eval_every": "25"}
    )
    assert (config.steps, config.batch_size, config.eval_every) == (50, 8, 25)
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("moe-huge")


def test_moe_small_preset_is_what_the_issue_says():
    c = build_config("moe-small")
    assert (c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.seq_len) == (256, 256, 4, 4, 256)
    assert (c.n_experts, c.top_k, c.d_ff, c.activation, c.capacity_factor, c.aux_loss) == (
        8,
        2,
        512,
        "gelu",
        0.0,
        0.01,
    )
    assert (c.lr, c.beta1, c.beta2, c.weight_decay, c.warmup_steps, c.decay_steps, c.min_lr) == (
        1e-3,
        0.9,
        0.95,
        0.1,
        50,
        600,
        1e-4,
    )
    assert (c.clip, c.batch_size, c.dtype, c.seed, c.norm, c.score) == (
        1.0,
        16,
        "float32",
        0,
        "layernorm",
        "softmax",
    )


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_bytes(b"x" * 500)
    with pytest.raises(DataError, match=r"needs at least 257 .* at least 5,140 tokens"):
        load_corpus(tmp_path / "short.txt").check_length(256)
    np.save(tmp_path / "ids.npy", np.array([1, 2, 300], np.uint16))
    with pytest.raises(DataError, match="--vocab"):
        load_corpus(tmp_path / "ids.npy")
    with pytest.raises(DataError, match="token id 300"):
        load_corpus(tmp_path / "ids.npy", vocab_size=256)
    assert load_corpus(tmp_path / "ids.npy", vocab_size=512).tokens.tolist() == [1, 2, 300]


def test_builtin_corpus_follows_the_rules():
    c = load_corpus(None)
    assert c.vocab_size == 256 and c.files > 100 and len(c.tokens) > 1_000_000
    assert len(c.val) == len(c.tokens) - int(len(c.tokens) * 0.95)
    root = Path(os.__file__).parent
    assert (
        bytes(c.tokens[:200].astype(np.uint8))
        == sorted(
            (
                p
                for p in root.rglob("*.py")
                if not {"site-packages", "test", "tests", "idle_test"}
                & set(p.relative_to(root).parts[:-1])
            ),
            key=str,
        )[0].read_bytes()[:200]
    )


def test_cli_train_generate_eval_report(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--preset",
            "moe-tiny",
            "--data",
            str(corpus),
            "--out",
            str(out),
            "--set",
            "steps=4",
            "eval_every=2",
            "seq_len=32",
        ]
    )
    assert code == 0
    assert "finished after 4 steps" in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert (
        main(
            [
                "generate",
                "--run",
                str(out),
                "--prompt",
                "def ",
                "--tokens",
                "20",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text) >= 4
    assert main(["eval", "--run", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert main(["report", str(out)]) == 0
    assert "steps      4" in capsys.readouterr().out
    assert main(["train", "--preset", "moe-tiny", "--data", str(corpus), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--set", "top_k=99"]) == 2
    assert "top_k (99) must not exceed" in capsys.readouterr().err
    assert main(["generate", "--run", str(tmp_path / "none")]) == 2


def test_non_finite_gradients_are_skipped_then_stop_the_run(tmp_path, corpus):
    from moecore.train import TrainingDiverged

    trainer = Trainer(
        tiny(corpus, steps=10, max_bad_steps=3, eval_every=0), tmp_path / "run", out=io.StringIO()
    )
    trainer.model.tok_emb.weight.data[:] = np.nan
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped"] for r in records] == [True, True, True]


def test_cli_train_names_an_unusable_run_folder(tmp_path, corpus, capsys):
    from moecore.cli import main

    def train(out):
        args = ["train", "--preset", "moe-tiny", "--data", str(corpus), "--out", str(out)]
        return main([*args, "--set", "steps=1", "eval_every=0", "checkpoint_every=0"])

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert train(a_file) == 2
    assert f"moecore: error: --out {a_file} is a file, not a folder" in capsys.readouterr().err
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("x")
    assert train(blocked) == 2
    err = capsys.readouterr().err
    assert f"{blocked / 'checkpoints'} is a file; a run keeps its checkpoints" in err
    # A folder where the metrics file goes: found when training opens it, named, exit 2.
    metrics_dir = tmp_path / "metrics_dir"
    (metrics_dir / "metrics.jsonl").mkdir(parents=True)
    assert train(metrics_dir) == 2
    err = capsys.readouterr().err
    assert "moecore: error: cannot write the run:" in err and "metrics.jsonl" in err, err
