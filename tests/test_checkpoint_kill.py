"""``kill -9`` inside the write of a checkpoint's tensor file (not only before its folder is
published): the previous checkpoint is still the latest, loads with the values it was saved
with, and the run resumes from it."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moecore.train import Trainer, build_config
from moecore.train import checkpoint as ckpt

HOOK = Path(__file__).parent / "train_paused_mid_write.py"


def test_kill_9_in_the_middle_of_a_tensor_file_keeps_the_previous_checkpoint(tmp_path):
    root = Path(os.__file__).parent
    data = tmp_path / "corpus.txt"
    data.write_bytes(b"".join(p.read_bytes() for p in sorted(root.glob("[a-c]*.py")))[:200_000])
    out = tmp_path / "run"
    config = build_config(
        "moe-tiny",
        overrides=dict(
            data=str(data), steps=4, eval_every=0, checkpoint_every=0, seq_len=32, batch_size=4
        ),
    )
    Trainer(config, out, out=io.StringIO()).train()
    before = ckpt.latest(out)
    saved, _ = ckpt.load(before)
    marker = tmp_path / "paused"
    cmd = [sys.executable, str(HOOK), str(marker), "train", "--resume", str(out)]
    cmd += ["--set", "steps=6"]
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
                time.sleep(0.02)
            time.sleep(0.1)  # the marker's text is written
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert marker.exists(), log.read_text()
    # Killed with part of the tensor file on disk, inside the unpublished folder.
    path, size = marker.read_text().split()
    partial = Path(path)
    assert partial.parent.name.startswith(".step_00000006.tmp-"), partial
    assert partial.name == "model.safetensors" and partial.stat().st_size == int(size) > 0
    assert not (partial.parent / "state.json").exists()
    assert ckpt.latest(out) == before
    groups, state = ckpt.load(before)
    assert state["step"] == 4
    for name, value in saved["model"].items():
        np.testing.assert_array_equal(groups["model"][name], value, err_msg=name)
    resumed = Trainer.resume(out, out=io.StringIO(), overrides={"steps": 6})
    assert resumed.train().steps_done == 6
    assert ckpt.latest(out).name == "step_00000006"
    assert not list((out / "checkpoints").glob(".step_*"))  # the killed writer's temporary
