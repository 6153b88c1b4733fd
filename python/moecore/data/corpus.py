"""Corpora as one sequence of token ids: the built-in one (Python's standard library source),
text files or folders (bytes as tokens), ``.bin``/``.npy`` files of uint16 ids, or a folder
written by ``moecore prepare`` (memory-mapped shards, see :mod:`moecore.data.shards`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moecore.data.shards import TokenView, check_shards, is_prepared, read_index, validation_split
from moecore.errors import DataError

SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
VALIDATION_FRACTION = 0.05


@dataclass(frozen=True)
class Corpus:
    """Token ids split into train and validation parts: the last 5% validates (for
    prepared data, the last whole documents holding 5% of the bytes)."""

    name: str
    #: A numpy array, or a :class:`TokenView` of memory-mapped shards.
    tokens: Any
    vocab_size: int
    files: int
    #: Where validation starts when not at 95% of the tokens (prepared data).
    split: int | None = None
    #: Content hash when it is not that of ``tokens`` (prepared data: of the shards' sums).
    checksum: str | None = None
    #: The index's tokenizer record (None: raw bytes, vocabulary 256).
    tokenizer: dict[str, Any] | None = None
    #: The prepared folder the data comes from.
    folder: Path | None = None
    #: UTF-8 bytes of the validation text (bits per byte = nats/token · tokens / bytes / ln 2).
    val_bytes: int | None = None

    @property
    def split_at(self) -> int:
        """Index where the validation split starts."""
        if self.split is not None:
            return self.split
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
        """A short content hash (first 12 hex digits of SHA-256 of the token bytes, or for
        prepared data of the shards' SHA-256 sums)."""
        if self.checksum is not None:
            return self.checksum[:12]
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
            if self.split is not None:
                raise DataError(
                    f"{self.name} has {len(self.train):,} training and {len(self.val):,} "
                    f"validation tokens; with seq_len {seq_len} each split needs at least {need}"
                )
            total = int(np.ceil(need / VALIDATION_FRACTION))
            raise DataError(
                f"{self.name} has {len(self.tokens):,} tokens; with seq_len {seq_len} each split "
                f"needs at least {need} (so at least {total:,} tokens in all, since validation "
                f"is the last {VALIDATION_FRACTION:.0%})"
            )


def _python_files(root: Path) -> list[Path]:
    found: list[Path] = []
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


def open_prepared(folder: str | os.PathLike[str], verify: bool = True) -> Corpus:
    """The shards of a ``moecore prepare`` folder, memory-mapped (nothing is read whole but,
    when ``verify``, each file once through SHA-256 against the index)."""
    folder = Path(folder)
    index = read_index(folder)
    check_shards(folder, index, checksums=verify)
    shards = index["shards"]
    view = TokenView(
        [folder / s["file"] for s in shards],
        [int(s["tokens"]) for s in shards],
        np.dtype(index["dtype"]),
    )
    split, val_bytes = validation_split(folder, index)
    checksum = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()
    return Corpus(
        str(folder),
        view,
        int(index["vocab_size"]),
        int(index.get("files", len(shards))),
        split=split,
        checksum=checksum,
        tokenizer=dict(index["tokenizer"]),
        folder=folder,
        val_bytes=val_bytes,
    )


def load_corpus(
    path: str | os.PathLike[str] | None = None, vocab_size: int | None = None, verify: bool = True
) -> Corpus:
    """The built-in corpus (``path`` None), a ``moecore prepare`` folder (memory-mapped;
    ``verify`` checks its SHA-256 sums), a text file or folder of text files (bytes as
    tokens, vocab 256), or a ``.bin``/``.npy`` file of uint16 ids (needs ``vocab_size``)."""
    if path is None or str(path) == "":
        return builtin_corpus()
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if is_prepared(p):
        return open_prepared(p, verify)
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
