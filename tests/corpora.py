"""Small corpora for the tests: the built-in one is 12 MB, a slice of the standard library's
own source keeps training tests fast."""

from __future__ import annotations

import os
from pathlib import Path


def write_stdlib_corpus(directory: Path, size: int) -> Path:
    """Writes the first ``size`` bytes of the standard library's ``[a-c]*.py`` files to
    ``directory/corpus.txt`` and returns its path."""
    root = Path(os.__file__).parent
    text = b"".join(p.read_bytes() for p in sorted(root.glob("[a-c]*.py")))
    path = directory / "corpus.txt"
    path.write_bytes(text[:size])
    return path
