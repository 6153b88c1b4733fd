"""Prepared token data (``moecore prepare``'s output): the index, its shards memory-mapped,
and a view over them that reads only the tokens asked for.

A folder holds ``index.json``, ``shard_NNNNN.bin`` (raw little-endian token ids, uint16 when
the vocabulary fits, uint32 otherwise; every document followed by the end-of-document id),
``shard_NNNNN.docs.npy`` (int64 rows ``[first token, UTF-8 bytes]``, one per document) and,
for a ``tokenizers`` tokenizer, ``tokenizer.json``. docs/data.md describes the format."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from moecore.errors import DataError

INDEX = "index.json"
FORMAT = "moecore-shards"
VERSION = 1
#: Share of the bytes held out for validation: the last documents, whole.
VALIDATION_FRACTION = 0.05


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks (nothing kept)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename: a reader sees the
    old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``moecore prepare`` (it holds ``index.json``)."""
    return (Path(path) / INDEX).is_file()


def read_index(folder: Path) -> dict[str, Any]:
    """``folder/index.json``, checked for the fields a reader needs."""
    path = folder / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not a moecore shard index (format {FORMAT!r})")
    if index.get("version") != VERSION:
        raise DataError(f"{path} has format version {index.get('version')}, this reads {VERSION}")
    for key in ("dtype", "vocab_size", "eod_id", "tokenizer", "shards"):
        if key not in index:
            raise DataError(f"{path} lacks the field {key!r}")
    if np.dtype(index["dtype"]) != shard_dtype(int(index["vocab_size"])):
        raise DataError(f"{path}: dtype {index['dtype']} does not suit vocab {index['vocab_size']}")
    if not index["shards"]:
        raise DataError(f"{path} names no shard (no documents were found)")
    return index


def check_shards(folder: Path, index: dict[str, Any], checksums: bool = True) -> None:
    """Raises :class:`DataError` naming the first shard that is missing, of the wrong size
    or (``checksums``) whose SHA-256 differs from the index's."""
    itemsize = np.dtype(index["dtype"]).itemsize
    for shard in index["shards"]:
        for name, digest, size in (
            (shard["file"], shard["sha256"], int(shard["tokens"]) * itemsize),
            (shard["docs_file"], shard["docs_sha256"], None),
        ):
            path = folder / name
            if not path.is_file():
                raise DataError(f"{path} is missing (named by {folder / INDEX})")
            if size is not None and path.stat().st_size != size:
                raise DataError(
                    f"{path} has {path.stat().st_size:,} bytes, its index says {size:,}: damaged"
                )
            if checksums and sha256_file(path) != digest:
                raise DataError(
                    f"{path} does not match its SHA-256 in {folder / INDEX}: damaged "
                    "(run moecore prepare again)"
                )


class TokenView:
    """Token ids of several shards seen as one 1-D sequence, read lazily from memory maps:
    ``view[a:b]`` is another view, ``view[int_array]`` reads those ids only."""

    def __init__(
        self, paths: list[Path], lengths: list[int], dtype: np.dtype, start: int = 0, stop: int = -1
    ) -> None:
        self.paths, self.lengths, self.dtype = paths, lengths, np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.start = start
        self.stop = int(self.offsets[-1]) if stop < 0 else stop
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            mm = np.memmap(self.paths[i], self.dtype, mode="r", shape=(self.lengths[i],))
            # Windows are read at random: without this hint the kernel reads ahead (and maps,
            # into our RSS) megabytes around each one.
            raw = getattr(mm, "_mmap", None)
            if raw is not None and hasattr(mmap, "MADV_RANDOM"):
                raw.madvise(mmap.MADV_RANDOM)
            self._maps[i] = mm
        return self._maps[i]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a TokenView slice takes no step")
            view = TokenView(self.paths, self.lengths, self.dtype, self.start + a, self.start + b)
            view._maps = self._maps  # share the open maps
            return view
        index = np.asarray(key, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"token index out of range 0..{len(self) - 1}")
        index = index + self.start
        out = np.empty(index.shape, self.dtype)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        for i in np.unique(shard):
            where = shard == i
            out[where] = self._map(int(i))[index[where] - self.offsets[i]]
        return out if out.ndim else out[()]

    def to_array(self) -> np.ndarray:
        """Every id of the view in memory (for small data and tests)."""
        return self[np.arange(len(self))]


def _docs(folder: Path, shard: dict[str, Any]) -> np.ndarray:
    docs = np.load(folder / shard["docs_file"], mmap_mode="r", allow_pickle=False)
    if docs.ndim != 2 or docs.shape != (int(shard["documents"]), 2):
        raise DataError(f"{folder / shard['docs_file']} has shape {docs.shape}: damaged")
    return docs


def validation_split(folder: Path, index: dict[str, Any]) -> tuple[int, int]:
    """(first validation token, validation bytes): the last whole documents that hold at
    least :data:`VALIDATION_FRACTION` of the bytes. With a single document, the last 5% of
    its tokens (bytes then counted as tokens × total bytes / total tokens)."""
    shards = index["shards"]
    total_bytes = sum(int(s["bytes"]) for s in shards)
    total_tokens = sum(int(s["tokens"]) for s in shards)
    want = VALIDATION_FRACTION * total_bytes
    taken, first_token = 0, total_tokens
    tokens_before = total_tokens
    for shard in reversed(shards):
        tokens_before -= int(shard["tokens"])
        docs = _docs(folder, shard)
        for start, size in docs[::-1]:
            taken += int(size)
            first_token = tokens_before + int(start)
            if taken >= want:
                break
        if taken >= want:
            break
    if first_token > 0:
        return first_token, taken
    split = int(total_tokens * (1 - VALIDATION_FRACTION))
    return split, round((total_tokens - split) * total_bytes / max(total_tokens, 1))
