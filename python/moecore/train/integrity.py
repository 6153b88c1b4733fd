"""Checkpoint integrity: a ``manifest.json`` in each checkpoint folder with the size and
SHA-256 of every other file, written last (the folder is then published by one rename), and
checked before anything in the folder is read.

SHA-256 (``hashlib``) rather than the extension's CRC32C: a user can check a checkpoint with
``sha256sum`` and no moecore, it does not depend on the compiled extension, and at the sizes
of a checkpoint it is not the bottleneck (hashlib runs at ~1-2 GB/s with the SHA extensions of
x86 and ARM CPUs; the fsync that follows is slower)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moecore.errors import CheckpointDamaged, CheckpointError  # noqa: F401 (re-exported)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def digest(data: bytes) -> str:
    """SHA-256 of ``data`` as hex."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def manifest_bytes(folder: Path, names: list[str]) -> bytes:
    """The manifest of the files ``names`` of ``folder`` (as they are on disk now)."""
    files = {}
    for name in sorted(names):
        size, sha = file_digest(folder / name)
        files[name] = {"bytes": size, "sha256": sha}
    body = {"manifest_version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}
    return json.dumps(body, indent=1).encode()


def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The files a checkpoint's manifest lists (name → {"bytes", "sha256"}); None when the
    folder has no manifest (written by moecore 0.x before checksums); :class:`CheckpointDamaged`
    when the manifest itself is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointDamaged(f"{path}: unreadable manifest ({exc})") from None
    files = body.get("files") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or body.get("manifest_version") != MANIFEST_VERSION
        or body.get("algorithm") != "sha256"
        or not isinstance(files, dict)
    ):
        raise CheckpointDamaged(f"{path}: not a moecore manifest (version 1, sha256)")
    for name, entry in files.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
            and "/" not in name
            and name not in ("", ".", "..", MANIFEST)
        )
        if not ok:
            raise CheckpointDamaged(f"{path}: malformed entry for {name!r}")
    return files


def verify(folder: Path) -> str | None:
    """Checks every file of a checkpoint folder against its manifest. Returns None when all
    match, or a note when the folder has no manifest (an older checkpoint, unverified);
    raises :class:`CheckpointDamaged` naming the first file that differs."""
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        return f"{folder}: no checksums (written before moecore kept them); loaded unverified"
    if "state.json" not in files:
        raise CheckpointDamaged(f"{folder / MANIFEST}: does not list state.json")
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointDamaged(f"{path}: missing (the manifest lists it)")
        size, sha = file_digest(path)
        if size != entry["bytes"]:
            raise CheckpointDamaged(
                f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or extended)"
            )
        if sha != entry["sha256"]:
            raise CheckpointDamaged(
                f"{path}: SHA-256 {sha[:16]}…, the manifest says {entry['sha256'][:16]}… "
                "(the content changed since it was written)"
            )
    return None
