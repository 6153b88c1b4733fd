"""Every subcommand's arguments are checked: bad counts and numbers, missing runs and a
prompt outside the vocabulary end the command with a message naming the problem and a
non-zero exit, before anything runs (and never with a traceback)."""

import io
import os
from pathlib import Path

import numpy as np
import pytest

from moecore.cli import main
from moecore.train import Trainer, build_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step moe-tiny run on a slice of the standard library."""
    root = Path(os.__file__).parent
    text = b"".join(p.read_bytes() for p in sorted(root.glob("[a-c]*.py")))[:200_000]
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "corpus.txt").write_bytes(text)
    settings = {"steps": 1, "eval_every": 0, "seq_len": 32, "data": str(tmp / "corpus.txt")}
    Trainer(build_config("moe-tiny", overrides=settings), tmp / "run", out=io.StringIO()).train()
    return tmp / "run"


def _exit(args, capsys):
    """(exit status, stderr) of ``moecore ARGS``."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens", "-5"], "argument --tokens: must be ≥ 1, got -5"),
        (["--tokens", "0"], "argument --tokens: must be ≥ 1, got 0"),
        (["--tokens", "many"], "argument --tokens: expected an integer, got 'many'"),
        (["--temperature", "nan"], "argument --temperature: expected a finite number"),
        (["--temperature", "-1"], "argument --temperature: must be ≥ 0"),
        (["--top-k", "0"], "argument --top-k: must be ≥ 1, got 0"),
        (["--seed", "-1"], "argument --seed: must be ≥ 0, got -1"),
    ],
)
def test_generate_refuses_bad_numbers(run, capsys, args, message):
    code, err = _exit(["generate", "--run", run, *args], capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--run", "{missing}"],
        ["eval", "--run", "{missing}"],
        ["train", "--resume", "{missing}"],
        ["report", "{missing}"],
        ["verify", "{missing}"],
    ],
)
def test_missing_run_is_named(tmp_path, capsys, args):
    missing = tmp_path / "no-such-run"
    code, err = _exit([a.format(missing=missing) for a in args], capsys)
    assert code == 2 and f"run directory {missing} does not exist" in err, err


def test_prompt_outside_the_vocabulary_is_refused(tmp_path, capsys):
    ids = np.random.default_rng(0).integers(0, 50, size=20_000).astype(np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    settings = {"steps": 1, "eval_every": 0, "seq_len": 32, "vocab_size": 50, "vocab": 50}
    config = build_config("moe-tiny", overrides={**settings, "data": str(tmp_path / "ids.npy")})
    Trainer(config, tmp_path / "run", out=io.StringIO()).train()
    code, err = _exit(["generate", "--run", tmp_path / "run", "--prompt", "d2"], capsys)
    assert code == 2, err
    assert "bytes [50, 100] outside the model's vocabulary of 50 tokens" in err, err
    code, err = _exit(["generate", "--run", tmp_path / "run", "--prompt", "\x01\x02"], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gbit", "nan"], "argument --gbit: expected a finite number"),
        (["--gbit", "0"], "argument --gbit: must be > 0, got 0"),
        (["--latency-us", "-5"], "argument --latency-us: must be ≥ 0"),
        (["--intra-latency-us", "inf"], "argument --intra-latency-us: expected a finite number"),
        (["--workers", "2", "0"], "argument --workers: must be ≥ 1, got 0"),
        (["--bucket-mb", "-1"], "argument --bucket-mb: must be > 0"),
        (["--ranks-per-node", "0"], "argument --ranks-per-node: must be ≥ 1"),
    ],
)
def test_plan_refuses_bad_numbers(capsys, args, message):
    code, err = _exit(["plan", "--preset", "moe-tiny", *args], capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dp", "0"], "argument --dp: must be ≥ 1, got 0"),
        (["--ep", "-2"], "argument --ep: must be ≥ 1, got -2"),
        (["--vocab", "0"], "argument --vocab: must be ≥ 1, got 0"),
        (["--bucket-mb", "-1"], "argument --bucket-mb: must be > 0"),
        (["--compress-warmup", "-1"], "argument --compress-warmup: must be ≥ 0"),
        (["--set", "lr=nan"], "lr: expected a finite number, got 'nan'"),
        (["--set", "warmup_steps=1e999"], "warmup_steps: expected int"),
        (["--set", "steps"], "--set expects key=value, got 'steps'"),
    ],
)
def test_train_refuses_bad_arguments_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, err = _exit(["train", "--preset", "moe-tiny", "--out", out, *args], capsys)
    assert code == 2 and message in err, err
    assert not (out / "metrics.jsonl").exists()
