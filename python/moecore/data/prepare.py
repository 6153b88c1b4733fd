"""``moecore prepare``: text files, folders and JSON Lines → token shards and their index.

The inputs are cut into shards by input size, in input order, before anything is tokenized,
so the cut depends only on the inputs and ``shard_mb``: processes tokenize shards in
parallel, and a run that was interrupted keeps the shards it finished (each is written to a
temporary file and renamed, then recorded by its own ``shard_NNNNN.json``)."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from moecore.data.corpus import _python_files, _text_files
from moecore.data.shards import FORMAT, INDEX, VERSION, sha256_file, shard_dtype, write_atomic
from moecore.data.tokenizer import (
    ByteTokenizer,
    load_tokenizer,
    require_tokenizers,
    tokenizer_from_json,
    tokenizer_record,
    train_bpe,
)
from moecore.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SETTINGS = "prepare.json"
#: Text encoded per call to the tokenizer.
_BATCH_BYTES = 1 << 22


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of an input file (whole lines of JSON Lines; a text file is
    always whole: it is one document)."""

    path: str
    jsonl: bool
    start: int
    end: int


def input_files(inputs: Sequence[str]) -> list[Path]:
    """The files ``inputs`` name: files, folders (every file not hidden, by path) and
    ``builtin`` (the built-in corpus's standard-library sources)."""
    files: list[Path] = []
    for item in inputs:
        if item == "builtin":
            files.extend(_python_files(Path(os.__file__).parent))
            continue
        p = Path(item)
        if p.is_dir():
            files.extend(_text_files(p))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {item} does not exist")
    if not files:
        raise DataError(f"no input files in {list(inputs)}")
    return files


def _cut_jsonl(path: Path, size: int, shard_bytes: int) -> list[Piece]:
    """Pieces of about ``shard_bytes``, each starting at a line."""
    cuts = [0]
    with open(path, "rb") as fh:
        while cuts[-1] + shard_bytes < size:
            fh.seek(cuts[-1] + shard_bytes)
            fh.readline()
            if fh.tell() >= size:
                break
            cuts.append(fh.tell())
    cuts.append(size)
    return [Piece(str(path), True, a, b) for a, b in itertools.pairwise(cuts)]


def plan_shards(files: Sequence[Path], shard_bytes: int) -> list[list[Piece]]:
    """Consecutive pieces grouped until a shard holds at least ``shard_bytes`` of input."""
    shards: list[list[Piece]] = [[]]
    filled = 0
    for path in files:
        size = path.stat().st_size
        jsonl = path.suffix in JSONL_SUFFIXES
        pieces = (
            _cut_jsonl(path, size, shard_bytes) if jsonl else [Piece(str(path), False, 0, size)]
        )
        for piece in pieces:
            if filled >= shard_bytes:
                shards.append([])
                filled = 0
            shards[-1].append(piece)
            filled += piece.end - piece.start
    return [s for s in shards if s]


def documents(piece: Piece) -> Iterator[str]:
    """The documents of a piece: a text file whole, or each line's ``text`` field."""
    if not piece.jsonl:
        yield Path(piece.path).read_bytes().decode("utf-8", errors="replace")
        return
    with open(piece.path, "rb") as fh:
        fh.seek(piece.start)
        at = piece.start
        while at < piece.end:
            line = fh.readline()
            if not line:
                break
            at += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(
                    f"{piece.path} at byte {at - len(line)}: not JSON ({exc})"
                ) from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(
                    f"{piece.path} at byte {at - len(line)}: a JSON Lines record needs a "
                    f"string field 'text'"
                )
            yield text


_worker_tokenizer: Any = None


def _init_worker(tokenizer: dict[str, Any]) -> None:
    global _worker_tokenizer
    # One thread per process: --workers is the only knob, and the output is the same.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tokenizer["kind"] == "bytes":
        _worker_tokenizer = ByteTokenizer()
    else:
        _worker_tokenizer = tokenizer_from_json(tokenizer["json"], tokenizer["eod"])


def _batches(pieces: Sequence[Piece]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for piece in pieces:
        for doc in documents(piece):
            if not doc:
                continue
            batch.append(doc)
            size += len(doc)
            if size >= _BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _shard_names(number: int) -> tuple[str, str, str]:
    stem = f"shard_{number:05d}"
    return f"{stem}.bin", f"{stem}.docs.npy", f"{stem}.json"


def write_shard(job: tuple[str, int, list[Piece], str]) -> dict[str, Any]:
    """Tokenizes a shard's pieces into ``out/shard_NNNNN.bin`` and its documents table,
    each through a temporary file and a rename, then records it in ``shard_NNNNN.json``."""
    out_dir, number, pieces, dtype_name = job
    out = Path(out_dir)
    tok, dtype = _worker_tokenizer, np.dtype(dtype_name)
    bin_name, docs_name, meta_name = _shard_names(number)
    tmp = out / f".{bin_name}.tmp-{os.getpid()}"
    h = hashlib.sha256()
    rows: list[tuple[int, int]] = []
    tokens = 0
    with open(tmp, "wb") as fh:
        for batch in _batches(pieces):
            for text, ids in zip(batch, tok.encode_batch(batch)):
                block = np.asarray([*ids, tok.eod_id], dtype=dtype).tobytes()
                fh.write(block)
                h.update(block)
                rows.append((tokens, len(text.encode("utf-8"))))
                tokens += len(ids) + 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out / bin_name)
    docs = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    tmp_docs = out / f".{docs_name}.tmp-{os.getpid()}"
    with open(tmp_docs, "wb") as fh:
        np.save(fh, docs, allow_pickle=False)
    os.replace(tmp_docs, out / docs_name)
    meta = {
        "file": bin_name,
        "tokens": tokens,
        "sha256": h.hexdigest(),
        "docs_file": docs_name,
        "docs_sha256": sha256_file(out / docs_name),
        "documents": len(rows),
        "bytes": int(docs[:, 1].sum()),
    }
    write_atomic(out / meta_name, json.dumps(meta).encode())
    return meta


def _finished(out: Path, number: int) -> dict[str, Any] | None:
    """A shard's record when the shard was finished and is intact, else None."""
    bin_name, _, meta_name = _shard_names(number)
    try:
        meta = json.loads((out / meta_name).read_text())
        intact = sha256_file(out / bin_name) == meta["sha256"]
        intact = intact and sha256_file(out / meta["docs_file"]) == meta["docs_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if intact else None


class _ProgressLine:
    """``prepare 3/12 shards  1,234,567 tokens  456,789 tok/s  eta 00:12`` (live on a TTY)."""

    def __init__(self, total_bytes: int, shards: int, out: TextIO) -> None:
        self.total_bytes, self.shards, self.out = total_bytes, shards, out
        self.live = bool(getattr(out, "isatty", lambda: False)())
        self.start = time.perf_counter()

    def show(self, done: int, done_bytes: int, new_bytes: int, tokens: int) -> None:
        elapsed = time.perf_counter() - self.start
        rate = new_bytes / elapsed if elapsed > 0 else 0.0
        eta = (self.total_bytes - done_bytes) / rate if rate > 0 else 0.0
        text = (
            f"prepare {done}/{self.shards} shards  {tokens:,} tokens  "
            f"{tokens / max(elapsed, 1e-9):,.0f} tok/s  eta {int(eta) // 60:02d}:{int(eta) % 60:02d}"
        )
        self.out.write(("\r\033[K" + text) if self.live else text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.live:
            self.out.write("\n")
            self.out.flush()


def _settings(
    files: Sequence[Path], tokenizer: str, train_vocab: int | None, eod: str | None, shard_mb: float
) -> dict[str, Any]:
    return {
        "inputs": [[str(f.resolve()), f.stat().st_size] for f in files],
        "tokenizer": None if train_vocab else tokenizer,
        "train_bpe": train_vocab,
        "eod": eod,
        "shard_mb": shard_mb,
    }


def _trained_tokenizer(out: Path, train_vocab: int, plan: list[list[Piece]]) -> Any:
    """The BPE trained on the inputs (resumed from ``out/tokenizer.json``), saved in ``out``."""
    saved = out / "tokenizer.json"
    if saved.is_file():
        return tokenizer_from_json(saved.read_text(encoding="utf-8"), None, str(saved))
    tok = train_bpe((d for shard in plan for p in shard for d in documents(p)), train_vocab)
    write_atomic(saved, tok.to_json().encode("utf-8"))
    return tok


def prepare(
    inputs: Sequence[str],
    out: str | os.PathLike[str],
    tokenizer: str = "bytes",
    train_vocab: int | None = None,
    eod: str | None = None,
    workers: int = 1,
    shard_mb: float = 64.0,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Tokenizes ``inputs`` into shards under ``out`` and writes ``out/index.json``;
    returns the index. ``tokenizer``: ``"bytes"`` or a ``tokenizer.json`` path;
    ``train_vocab``: train a byte-level BPE of that many ids on the inputs instead. A folder
    holding an unfinished preparation of the same inputs and settings is resumed."""
    if workers < 1 or not shard_mb > 0:
        raise DataError(f"workers must be ≥ 1 and shard_mb > 0, got {workers}, {shard_mb}")
    log = log if log is not None else sys.stderr
    out = Path(out)
    files = input_files(inputs)
    # A user's tokenizer (or the library to train one) is checked before anything is written.
    tok = require_tokenizers() if train_vocab else load_tokenizer(tokenizer, eod)
    settings = _settings(files, tokenizer, train_vocab, eod, shard_mb)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / SETTINGS
    if recorded.is_file():
        if json.loads(recorded.read_text()) != settings:
            raise DataError(
                f"{out} holds a preparation of other inputs or settings ({recorded}); "
                "give another --out"
            )
        if (out / INDEX).is_file():
            log.write(f"{out} is already prepared\n")
            return dict(json.loads((out / INDEX).read_text()))
    elif any(out.iterdir()):
        raise DataError(f"--out {out} is not empty and holds no preparation; give another --out")
    else:
        write_atomic(recorded, json.dumps(settings, indent=1).encode())
    plan = plan_shards(files, max(1, int(shard_mb * 2**20)))
    if train_vocab:
        tok = _trained_tokenizer(out, train_vocab, plan)
    elif tok.kind == "tokenizers":
        write_atomic(out / "tokenizer.json", tok.to_json().encode("utf-8"))
    record = tokenizer_record(tok)
    dtype = shard_dtype(tok.vocab_size)
    metas: dict[int, dict[str, Any]] = {}
    for number in range(len(plan)):
        if (meta := _finished(out, number)) is not None:
            metas[number] = meta
    if metas:
        log.write(f"resuming: {len(metas)} of {len(plan)} shards already written\n")
    for stale in out.glob(".shard_*.tmp-*"):  # left by an interrupted run
        stale.unlink()
    todo = [(str(out), n, plan[n], dtype.name) for n in range(len(plan)) if n not in metas]
    sizes = [sum(p.end - p.start for p in shard) for shard in plan]
    line = _ProgressLine(sum(sizes), len(plan), log)
    done_bytes = sum(sizes[n] for n in metas)
    new_bytes = 0
    new_tokens = 0
    init = {"kind": tok.kind, "json": tok.to_json() if tok.kind != "bytes" else "", "eod": None}
    if tok.kind != "bytes":
        init["eod"] = tok.inner.id_to_token(tok.eod_id)
    for number, meta in _run(todo, workers, init):
        metas[number] = meta
        done_bytes += sizes[number]
        new_bytes += sizes[number]
        new_tokens += meta["tokens"]
        line.show(len(metas), done_bytes, new_bytes, new_tokens)
    line.close()
    shards = [metas[n] for n in range(len(plan))]
    shards = [s for s in shards if s["tokens"]]
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "tokenizer": record,
        "files": len(files),
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    if not shards:
        raise DataError(f"the inputs {list(inputs)} hold no text")
    write_atomic(out / INDEX, json.dumps(index, indent=1).encode())
    return index


def _run(
    todo: list[tuple[str, int, list[Piece], str]], workers: int, init: dict[str, Any]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(shard number, record) of each job as it finishes: in this process, or ``workers``."""
    if workers == 1 or len(todo) <= 1:
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        _init_worker(init)
        try:
            for job in todo:
                yield job[1], write_shard(job)
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        return
    # spawn: a fork after the tokenizers library has run its thread pool (BPE training)
    # could deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(init,)) as pool:
        yield from pool.imap_unordered(_numbered_shard, todo)


def _numbered_shard(job: tuple[str, int, list[Piece], str]) -> tuple[int, dict[str, Any]]:
    return job[1], write_shard(job)
