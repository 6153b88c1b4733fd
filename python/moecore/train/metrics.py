"""The metrics log: one JSON object per line in ``RUN_DIR/metrics.jsonl``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them readable
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _clean(value.item())
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return value


class MetricsLog:
    """Appends records to a JSON-lines file; ``offset`` is what a checkpoint remembers so a
    resumed run can cut the lines written after it."""

    def __init__(self, path: Path, resume_offset: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_offset is not None and self.path.exists():
            with open(self.path, "r+b") as fh:
                fh.truncate(resume_offset)
        self._fh = open(self.path, "ab")

    @property
    def offset(self) -> int:
        """Bytes written so far (flushed)."""
        self._fh.flush()
        return self._fh.tell()

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record."""
        self._fh.write((json.dumps(_clean(record), separators=(",", ":")) + "\n").encode())
        self._fh.flush()

    def sync(self) -> None:
        """Flushes to disk (before a checkpoint records the offset)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Closes the file."""
        self._fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file (a torn last line, from a crash, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
