"""Corpora as one array of token ids: the built-in one (Python's standard library source),
text files or folders (bytes as tokens), or ``.bin``/``.npy`` files of uint16 ids."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moecore.errors import DataError

SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
VALIDATION_FRACTION = 0.05


@dataclass(frozen=True)
class Corpus:
    """Token ids split into train and validation parts (the last 5% validates)."""

    name: str
    tokens: np.ndarray
    vocab_size: int
    files: int

    @property
    def split_at(self) -> int:
        """Index where the validation split starts."""
        return int(len(self.tokens) * (1 - VALIDATION_FRACTION))

    @property
    def train(self) -> np.ndarray:
        """The training tokens."""
        return self.tokens[: self.split_at]

    @property
    def val(self) -> np.ndarray:
        """The validation tokens."""
        return self.tokens[self.split_at :]

    @property
    def digest(self) -> str:
        """A short content hash (first 12 hex digits of SHA-256 of the token bytes)."""
        return hashlib.sha256(self.tokens.tobytes()).hexdigest()[:12]

    def describe(self) -> str:
        """One line: name, size, files, hash."""
        return (
            f"{self.name}: {len(self.tokens):,} tokens from {self.files} file(s), "
            f"vocab {self.vocab_size}, sha256 {self.digest}"
        )

    def check_length(self, seq_len: int) -> None:
        """Raises :class:`DataError` unless both splits hold at least one sequence."""
        need = seq_len + 1
        shortest = min(len(self.train), len(self.val))
        if shortest < need:
            total = int(np.ceil(need / VALIDATION_FRACTION))
            raise DataError(
                f"{self.name} has {len(self.tokens):,} tokens; with seq_len {seq_len} each split "
                f"needs at least {need} (so at least {total:,} tokens in all, since validation "
                f"is the last {VALIDATION_FRACTION:.0%})"
            )


def _python_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: str(p))


def builtin_corpus() -> Corpus:
    """Every ``*.py`` under the standard library folder (that of the ``os`` module), skipping
    ``site-packages``, ``test``, ``tests`` and ``idle_test`` folders, sorted by full path,
    raw bytes concatenated; no download."""
    root = Path(os.__file__).parent
    files = _python_files(root)
    data = b"".join(p.read_bytes() for p in files)
    if not data:
        raise DataError(f"no Python source found under {root}")
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    return Corpus(f"python-stdlib ({root})", tokens, 256, len(files))


def _text_files(path: Path) -> list[Path]:
    files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: str(p))
    return [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]


def load_corpus(
    path: str | os.PathLike[str] | None = None, vocab_size: int | None = None
) -> Corpus:
    """The built-in corpus (``path`` None), a text file or folder of text files (bytes as
    tokens, vocab 256), or a ``.bin``/``.npy`` file of uint16 ids (needs ``vocab_size``)."""
    if path is None or str(path) == "":
        return builtin_corpus()
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if p.is_dir():
        files = _text_files(p)
        data = b"".join(f.read_bytes() for f in files)
        if not data:
            raise DataError(f"data folder {p} holds no data")
        return Corpus(str(p), np.frombuffer(data, np.uint8).astype(np.uint16), 256, len(files))
    if p.suffix in (".bin", ".npy"):
        if vocab_size is None:
            raise DataError(f"{p} holds token ids: give the vocabulary size (--vocab N)")
        try:
            ids = (
                np.load(p, allow_pickle=False)
                if p.suffix == ".npy"
                else np.fromfile(p, dtype=np.uint16)
            )
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read token ids from {p}: {exc}") from exc
        if ids.dtype != np.uint16 or ids.ndim != 1:
            raise DataError(
                f"{p} must hold a 1-D array of uint16 token ids, got {ids.dtype} {ids.shape}"
            )
        if ids.size == 0:
            raise DataError(f"{p} is empty")
        if int(ids.max()) >= vocab_size:
            raise DataError(f"{p} has token id {int(ids.max())} ≥ vocab size {vocab_size}")
        return Corpus(str(p), ids, vocab_size, 1)
    data = p.read_bytes()
    if not data:
        raise DataError(f"data file {p} is empty")
    return Corpus(str(p), np.frombuffer(data, np.uint8).astype(np.uint16), 256, 1)
