"""Checkpoints: a folder per step with tensors in safetensors and everything else in JSON,
written atomically (temporary folder, fsync, rename) so a crash — even ``kill -9`` in the
middle of a write — never leaves a broken checkpoint where a good one was expected."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from moecore.train import safetensors

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# Test hook: seconds to pause between writing the files and publishing the folder, so a
# test can kill the process in the middle of a checkpoint write deterministically.
_PAUSE_ENV = "MOECORE_CHECKPOINT_PAUSE"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Any) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_file(tmp, lambda fh: fh.write(data))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The published checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def save(
    run_dir: Path,
    step: int,
    groups: dict[str, dict[str, np.ndarray]],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Writes checkpoint ``step`` (one safetensors file per group of tensors, plus
    ``state.json``) and keeps only the newest ``keep`` checkpoints. Returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in groups.items():
        _write_file(
            tmp / f"{name}.safetensors",
            lambda fh, t=tensors: safetensors.write(fh, t, {"format": "pt"}),
        )
    meta = {"format_version": FORMAT_VERSION, "step": step, "files": sorted(groups), **state}
    _write_file(tmp / "state.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    _fsync_dir(tmp)
    pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    if pause:
        time.sleep(pause)
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        old = root / f".step_{step:08d}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".step_*"):  # temporaries of killed writers
        if not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def load(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Reads a checkpoint folder → (tensor groups, state); raises :class:`CheckpointError`
    naming the file and the problem."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing (not a checkpoint folder)")
    try:
        state = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_file}: corrupt JSON ({exc})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_file}: checkpoint format {state.get('format_version')!r}, this moecore reads {FORMAT_VERSION}"
        )
    groups = {}
    for name in state.get("files", []):
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        try:
            groups[name], _ = safetensors.read(str(file))
        except safetensors.SafetensorsError as exc:
            raise CheckpointError(str(exc)) from None
    return groups, state


def latest(run_dir: Path) -> Path:
    """The newest checkpoint of a run; :class:`CheckpointError` if there is none."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint found")
    return dirs[-1]
