"""Checkpoints: a folder per step with tensors in safetensors and everything else in JSON,
written atomically (temporary folder, fsync, rename) so a crash — even ``kill -9`` in the
middle of a write — never leaves a broken checkpoint where a good one was expected. The last
file written is ``manifest.json`` (size and SHA-256 of every other file, see
:mod:`moecore.train.integrity`), checked before a checkpoint is read: a damaged checkpoint is
refused, never used, and :func:`newest_intact` falls back to the one before it."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from moecore.train import integrity, safetensors
from moecore.train.integrity import CheckpointDamaged, CheckpointError

__all__ = [
    "CheckpointDamaged",
    "CheckpointError",
    "checkpoint_dirs",
    "fsync_dir",
    "latest",
    "load",
    "newest_intact",
    "publish",
    "quarantine",
    "save",
    "write_atomic",
    "write_file",
]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_]+$")
# Test hook: seconds to pause between writing the files and publishing the folder, so a
# test can kill the process in the middle of a checkpoint write deterministically.
_PAUSE_ENV = "MOECORE_CHECKPOINT_PAUSE"


def fsync_dir(path: Path) -> None:
    """Makes a folder's entries (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Any) -> None:
    """Creates ``path`` with what ``write(fh)`` writes, flushed to disk."""
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_file(tmp, lambda fh: fh.write(data))
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
    tmp = root / f".step_{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in groups.items():
        write_file(
            tmp / f"{name}.safetensors",
            lambda fh, t=tensors: safetensors.write(fh, t, {"format": "pt"}),
        )
    meta = {"format_version": FORMAT_VERSION, "step": step, "files": sorted(groups), **state}
    write_file(tmp / "state.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    # Last: the checksums of what is now on disk (read back, so a write that went wrong
    # between our buffer and the file is caught by the next load, not recorded as good).
    names = [f"{name}.safetensors" for name in groups] + ["state.json"]
    manifest = integrity.manifest_bytes(tmp, names)
    write_file(tmp / integrity.MANIFEST, lambda fh: fh.write(manifest))
    fsync_dir(tmp)
    return publish(run_dir, step, tmp, keep)


def publish(run_dir: Path, step: int, tmp: Path, keep: int) -> Path:
    """Renames the complete temporary folder ``tmp`` to checkpoint ``step`` (atomically)
    and keeps only the newest ``keep`` checkpoints. Returns the checkpoint's folder."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
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
    fsync_dir(root)
    for stale in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".step_*"):  # temporaries of killed writers
        if not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def _read_state(state_file: Path) -> dict[str, Any]:
    """``state.json`` → dict, its shape checked; :class:`CheckpointError` naming the file."""
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing (not a checkpoint folder)")
    try:
        state = json.loads(state_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{state_file}: corrupt JSON ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file}: corrupt (not a JSON object)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_file}: checkpoint format {state.get('format_version')!r}, this moecore reads {FORMAT_VERSION}"
        )
    files = state.get("files", [])
    step = state.get("step")
    if not isinstance(files, list) or not all(
        isinstance(f, str) and _GROUP_NAME.match(f) for f in files
    ):
        raise CheckpointError(f"{state_file}: corrupt ('files' is not a list of names)")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{state_file}: corrupt ('step' is {step!r})")
    named = _STEP_DIR.match(state_file.parent.name)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{state_file}: step {step}, but the folder is {named.group(0)}")
    offset = state.get("metrics_offset", 0)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise CheckpointError(f"{state_file}: corrupt ('metrics_offset' is {offset!r})")
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{state_file}: corrupt (no 'config' object)")
    return state


def load(
    path: Path, notes: list[str] | None = None, lazy: bool = False
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Reads a checkpoint folder → (tensor groups, state), after checking every file against
    the manifest; raises :class:`CheckpointDamaged` when a file differs from it and
    :class:`CheckpointError` naming the file and the problem otherwise. A checkpoint without
    a manifest (older moecore) is read unverified, with a note appended to ``notes``.
    ``lazy``: a sharded checkpoint's tensors come as memory-mapped
    :class:`~moecore.train.sharded_checkpoint.Assembled` views, read only where used."""
    path = Path(path)
    note = integrity.verify(path) if (path / "state.json").is_file() else None
    if note is not None and notes is not None:
        notes.append(note)
    state = _read_state(path / "state.json")
    if "sharded" in state:  # written by every rank (ZeRO): consolidated here
        from moecore.train.sharded_checkpoint import consolidate

        return consolidate(path, state, lazy), state
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


def newest_intact(
    run_dir: Path, notes: list[str] | None = None, lazy: bool = False
) -> tuple[Path, dict[str, dict[str, Any]], dict[str, Any], list[tuple[Path, str]]]:
    """The newest checkpoint of a run that loads and matches its manifest → (folder, tensor
    groups, state, [(damaged newer folder, what is wrong)]). Damaged checkpoints are skipped,
    never changed; :class:`CheckpointError` (listing them) when none is intact. ``lazy``:
    as :func:`load`'s."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint found")
    damaged: list[tuple[Path, str]] = []
    for path in reversed(dirs):
        try:
            groups, state = load(path, notes, lazy)
        except CheckpointError as exc:
            damaged.append((path, str(exc)))
            continue
        return path, groups, state, damaged
    if len(damaged) == 1:
        raise CheckpointError(damaged[0][1])
    listed = "\n  - ".join(why for _, why in damaged)
    raise CheckpointError(f"no intact checkpoint in {Path(run_dir)}:\n  - {listed}")


def quarantine(path: Path) -> Path:
    """Renames a damaged checkpoint folder ``step_N`` to ``step_N.damaged`` (``.damaged-2`` …
    if taken): kept for inspection, but no longer loaded, pruned, or overwritten when the
    run saves step N again. Returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.damaged")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{n}")
        n += 1
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def latest(run_dir: Path) -> Path:
    """The newest checkpoint of a run; :class:`CheckpointError` if there is none."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no checkpoint found")
    return dirs[-1]
