"""Small corpora for the tests: the built-in one is 12 MB, a slice of the standard library's
own source keeps training tests fast."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def write_stdlib_corpus(directory: Path, size: int) -> Path:
    """Writes the first ``size`` bytes of the standard library's ``[a-c]*.py`` files to
    ``directory/corpus.txt`` and returns its path."""
    root = Path(os.__file__).parent
    text = b"".join(p.read_bytes() for p in sorted(root.glob("[a-c]*.py")))
    path = directory / "corpus.txt"
    path.write_bytes(text[:size])
    return path


def write_prepared(folder: Path, shards: list[list[np.ndarray]], vocab_size: int, eod: int) -> Path:
    """Writes ``shards`` (each a list of documents, arrays of ids) in the format docs/data.md
    describes — written here from that description, not with moecore's writer — and returns
    ``folder``. Each document's UTF-8 size is recorded as 2 bytes per token."""
    dtype = np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for n, docs in enumerate(shards):
        ids = np.concatenate([np.append(d, eod) for d in docs]).astype(dtype)
        starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
        table = np.stack([starts, [2 * len(d) for d in docs]], axis=1).astype(np.int64)
        (folder / f"s{n}.bin").write_bytes(ids.tobytes())
        np.save(folder / f"s{n}.docs.npy", table)
        records.append(
            {
                "file": f"s{n}.bin",
                "tokens": int(ids.size),
                "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
                "docs_file": f"s{n}.docs.npy",
                "docs_sha256": hashlib.sha256((folder / f"s{n}.docs.npy").read_bytes()).hexdigest(),
                "documents": len(docs),
                "bytes": int(table[:, 1].sum()),
            }
        )
    index = {
        "format": "moecore-shards",
        "version": 1,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eod_id": eod,
        "tokenizer": {"kind": "none", "vocab_size": vocab_size, "eod_id": eod},
        "files": len(shards),
        "shards": records,
    }
    (folder / "index.json").write_text(json.dumps(index))
    return folder
