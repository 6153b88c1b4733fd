"""What a resume says and does about damaged checkpoints it skipped: a warning naming each
damaged file and what was found, a record in ``metrics.jsonl``, and (once training goes on)
the damaged folder moved aside — never deleted — so the run does not save over it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from moecore.train import checkpoint


@dataclass
class ResumeReport:
    """The checkpoint a run resumed from and the newer ones it skipped as damaged."""

    used: Path
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def warn(self, err: TextIO | None = None) -> None:
        """Prints one warning per damaged checkpoint and per note (older format)."""
        err = err or sys.stderr
        for path, why in self.damaged:
            print(
                f"moecore: warning: checkpoint {path.name} is damaged and was not used: {why}",
                file=err,
            )
        if self.damaged:
            print(f"moecore: warning: using {self.used.name} instead", file=err)
        for note in self.notes:
            print(f"moecore: note: {note}", file=err)

    def set_aside(self) -> list[dict[str, Any]]:
        """Moves each damaged checkpoint to ``step_N.damaged`` and returns the metrics records
        that say so."""
        records = []
        for path, why in self.damaged:
            moved = checkpoint.quarantine(path) if path.exists() else path
            records.append(
                {
                    "event": "checkpoint_damaged",
                    "checkpoint": path.name,
                    "moved_to": moved.name,
                    "problem": why,
                    "resumed_from": self.used.name,
                }
            )
        return records
