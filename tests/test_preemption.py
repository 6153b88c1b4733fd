"""Preemption in one process: SIGTERM or SIGUSR1 mid-run lets the step finish, writes a
checkpoint of it and exits with status 75; resuming continues the loss curve of an
uninterrupted run bit-exactly."""

import os
import signal
import subprocess
import sys
import time

import pytest

from moecore.train import checkpoint as ckpt
from moecore.train.metrics import read_metrics
from moecore.train.preemption import PREEMPTED_EXIT

SETTINGS = {"eval_every": 0, "checkpoint_every": 1000, "seq_len": 32, "batch_size": 4}


def _cli(*args):
    """``moecore ARGS`` in a subprocess with the environment of the signalled run (one BLAS
    thread: the same summation order, so the curves can be compared bit for bit)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "moecore.cli", *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def start_and_signal(cmd, out, sig, after_steps=3, pid_of=None):
    """Starts ``cmd`` (a training run writing ``out``), waits for ``after_steps`` metrics
    lines, sends ``sig`` to one process (``pid_of(proc)``, default the command itself), and
    returns (exit status, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_bytes().splitlines()) >= after_steps:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
        os.kill(pid_of(proc) if pid_of else proc.pid, sig)
        text = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_the_step_exits_75_and_resume_continues_bit_exactly(tmp_path, corpus, sig):
    out = tmp_path / "run"
    sets = [f"{k}={v}" for k, v in {**SETTINGS, "steps": 100_000, "data": corpus}.items()]
    cmd = [sys.executable, "-m", "moecore.cli", "train", "--preset", "moe-tiny"]
    code, text = start_and_signal([*cmd, "--out", str(out), "--set", *sets], out, sig)
    assert code == PREEMPTED_EXIT, text
    assert f"preempted ({sig.name})" in text, text
    done = _losses(out)
    _, state = ckpt.load(ckpt.latest(out))
    assert state["step"] == len(done) >= 3, "the checkpoint holds the last finished step"
    total = state["step"] + 3
    _cli("train", "--resume", out, "--set", f"steps={total}")
    reference = [f"{k}={v}" for k, v in {**SETTINGS, "steps": total, "data": corpus}.items()]
    _cli("train", "--preset", "moe-tiny", "--out", tmp_path / "reference", "--set", *reference)
    assert _losses(out) == _losses(tmp_path / "reference")  # bit-exact
