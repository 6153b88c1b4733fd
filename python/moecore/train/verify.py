"""``moecore verify RUN``: every checkpoint of a run (and any set aside as damaged) checked
against its manifest and read through, one line each."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from moecore.train import checkpoint

#: Exit statuses of ``moecore verify``.
INTACT, DAMAGED, NOTHING = 0, 1, 2


def verify_run(run_dir: Path, out: TextIO) -> int:
    """Checks each checkpoint of ``run_dir``, printing a line per checkpoint to ``out``.
    Returns :data:`INTACT` when all are intact (older ones without checksums included, noted),
    :data:`DAMAGED` when any is damaged, :data:`NOTHING` when the run has no checkpoint."""
    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        print(f"moecore: error: run directory {run_dir} does not exist", file=sys.stderr)
        return NOTHING
    folders = checkpoint.checkpoint_dirs(run_dir)
    set_aside = (
        sorted(p for p in root.glob("step_*.damaged*") if p.is_dir()) if root.is_dir() else []
    )
    if not folders and not set_aside:
        print(f"moecore: error: {root}: no checkpoint found", file=sys.stderr)
        return NOTHING
    damaged = 0
    for path in folders:
        notes: list[str] = []
        try:
            checkpoint.load(path, notes)
        except checkpoint.CheckpointError as exc:
            damaged += 1
            print(f"DAMAGED   {path.name}: {exc}", file=out)
            continue
        status = "UNVERIFIED" if notes else "ok"
        detail = f" ({notes[0]})" if notes else " (every file matches its SHA-256)"
        print(f"{status:<9} {path.name}{detail}", file=out)
    for path in set_aside:
        damaged += 1
        print(f"DAMAGED   {path.name}: set aside by an earlier resume", file=out)
    good = len(folders) - damaged + len(set_aside)
    print(
        f"{len(folders) + len(set_aside)} checkpoints: {good} intact, {damaged} damaged", file=out
    )
    return DAMAGED if damaged else INTACT
