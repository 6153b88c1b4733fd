"""``moecore`` (``python train_paused_mid_write.py MARKER <args>``) that stops in the middle
of writing a checkpoint's tensor file: when the model's safetensors file of a checkpoint is
being written, half of the bytes of its largest tensor go to disk (flushed and synced), the
file's size so far is written to MARKER, and the process sleeps — for a test to ``kill -9``
it there. Test code only: the library has no such hook."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from moecore.cli import main
from moecore.train import safetensors

_real_write = safetensors.write


class _StopHalfway:
    """A binary file that, given the bytes of ``tensor``, writes half of them and sleeps."""

    def __init__(self, fh: IO[bytes], nbytes: int, marker: Path) -> None:
        self.fh, self.nbytes, self.marker = fh, nbytes, marker

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) != self.nbytes:
            return self.fh.write(view)
        self.fh.write(view[: len(view) // 2])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.marker.write_text(f"{self.fh.name}\n{self.fh.tell()}\n")
        time.sleep(600)
        raise SystemExit("not killed")


def _write(fh: IO[bytes], tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    if "tok_emb.weight" in tensors:  # the model group
        largest = max(a.nbytes for a in tensors.values())
        fh = _StopHalfway(fh, largest, Path(sys.argv[1]))  # type: ignore[assignment]
    _real_write(fh, tensors, metadata)


safetensors.write = _write

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
