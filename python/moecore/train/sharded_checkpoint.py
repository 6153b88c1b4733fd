"""Sharded checkpoints (ZeRO): every rank writes its own part of the model and of the
optimizer state; reading consolidates them into the single-process layout.

A checkpoint folder ``step_N`` then holds ``shard_00000.safetensors`` … one per rank, each
with the elements that rank owns (``NAME@START``: elements ``START…`` of parameter NAME
flattened, in the single-process model's coordinates, experts included; optimizer arrays
as ``KEY/NAME@START``, their scalars in the file's metadata), and rank 0's ``state.json``
whose ``sharded`` entry names the shards and the layout (world, dp, ep, stage, every
parameter's name and shape in the optimizer's order). ``manifest.json`` (size and SHA-256
of every file, shards included) is written last and the folder is renamed into place as a
whole (:func:`moecore.train.checkpoint.publish`): a shard missing or damaged makes the
checkpoint refused as any damaged one, and nothing is overwritten.

The ranks write into one folder: the run directory must be shared by the ranks (as it is
for the metrics and the single-file checkpoints, which rank 0 writes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from moecore.distributed import Group
from moecore.train import integrity, safetensors
from moecore.train.checkpoint import fsync_dir, publish, write_file
from moecore.train.integrity import CheckpointError

__all__ = ["Assembled", "Owned", "consolidate", "save_sharded"]

#: (parameter name, first element in the flat single-process tensor, values, optimizer
#: state of those elements: arrays of the same length and scalars).
Owned = tuple[str, int, np.ndarray, dict[str, Any]]


def _shard_name(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


def save_sharded(
    run_dir: Path,
    step: int,
    group: Group,
    owned: list[Owned],
    layout: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path | None:
    """Writes checkpoint ``step`` from every rank's ``owned`` elements (a collective: every
    rank calls it; rank 0 also writes ``state`` with ``layout`` and publishes). Returns the
    folder on rank 0, None elsewhere."""
    root = Path(run_dir) / "checkpoints"
    pid = np.array([os.getpid()], dtype=np.int64)
    group.broadcast(pid, root=0)  # one temporary folder for all ranks: rank 0's
    tmp = root / f".step_{step:08d}.tmp-{int(pid[0])}"
    if group.is_root:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    group.barrier()
    tensors: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, start, values, opt in owned:
        key = f"{name}@{start}"
        tensors[key] = np.ascontiguousarray(values).reshape(-1)
        for k, v in opt.items():
            if isinstance(v, np.ndarray):
                tensors[f"{k}/{key}"] = np.ascontiguousarray(v).reshape(-1)
            else:
                scalars.setdefault(key, {})[k] = v
    meta = {"format": "pt", "scalars": json.dumps(scalars)}
    write_file(tmp / _shard_name(group.rank), lambda fh: safetensors.write(fh, tensors, meta))
    group.barrier()
    out = None
    if group.is_root:
        shards = [_shard_name(r) for r in range(group.size)]
        body = {"format_version": 1, "step": step, "files": [], **state}
        body["sharded"] = {**layout, "shards": shards}
        write_file(tmp / "state.json", lambda fh: fh.write(json.dumps(body, indent=1).encode()))
        manifest = integrity.manifest_bytes(tmp, [*shards, "state.json"])
        write_file(tmp / integrity.MANIFEST, lambda fh: fh.write(manifest))
        fsync_dir(tmp)
        out = publish(run_dir, step, tmp, keep)
    group.barrier()
    return out


class Assembled:
    """A tensor of the single-process layout assembled from the pieces the shards hold,
    read only where asked: ``read(lo, hi)`` gives flat elements ``lo…hi`` from the pieces
    that overlap them (memory-mapped shard files: nothing else is read), ``x[a:b]`` rows
    ``a…b``, and ``np.asarray(x)`` the whole tensor. This is how a rank resuming a sharded
    checkpoint takes its part without holding the model's and the optimizer's whole state
    (:meth:`moecore.distributed.zero.ShardedOptimizer.load_state_dict` cuts its pieces from
    it)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.size = int(np.prod(shape))
        self.ndim = len(shape)
        self.dtype = np.dtype(np.float32)
        self._pieces: list[tuple[int, np.ndarray]] = []

    def add(self, start: int, values: np.ndarray) -> None:
        """Records that flat elements ``start…start + values.size`` are ``values``."""
        self._pieces.append((start, values.reshape(-1)))

    def covered(self) -> int:
        """How many elements the recorded pieces hold (each element once in a good
        checkpoint: the writer's ranks own disjoint ranges)."""
        return sum(v.size for _, v in self._pieces)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Flat elements ``lo…hi`` as a new float32 array."""
        out = np.zeros(max(0, hi - lo), dtype=np.float32)
        for start, values in self._pieces:
            a, b = max(lo, start), min(hi, start + values.size)
            if a < b:
                out[a - lo : b - lo] = values[a - start : b - start]
        return out

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1) or not self.shape:
            return np.asarray(self)[rows]
        lo, hi, _ = rows.indices(self.shape[0])
        hi = max(lo, hi)
        row = self.size // self.shape[0] if self.shape[0] else 0
        return self.read(lo * row, hi * row).reshape(hi - lo, *self.shape[1:])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.read(0, self.size).reshape(self.shape)
        return whole if dtype is None else whole.astype(dtype, copy=False)


def consolidate(path: Path, state: dict[str, Any], lazy: bool = False) -> dict[str, dict[str, Any]]:
    """The tensor groups of a sharded checkpoint in the single-process layout (``model``:
    name → tensor; ``optimizer``: ``"INDEX.KEY"`` → tensor), its optimizer scalars put in
    ``state["optimizer"]["scalars"]``; :class:`CheckpointError` naming what is wrong.

    With ``lazy`` the parameters and optimizer arrays are :class:`Assembled` views of the
    memory-mapped shards (what a resuming rank reads only its part of); otherwise arrays."""
    layout = state["sharded"]
    try:
        params = [(str(n), tuple(int(d) for d in shape)) for n, shape in layout["params"]]
        shards = [str(s) for s in layout["shards"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: corrupt 'sharded' entry ({exc!r})") from None
    try:
        buffers = {str(n): tuple(int(d) for d in shape) for n, shape in layout["buffers"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: corrupt 'sharded' entry ({exc!r})") from None
    index = {name: i for i, (name, _) in enumerate(params)}
    model: dict[str, Any] = {n: Assembled(s) for n, s in params}
    optimizer: dict[str, Assembled] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (state.json lists it)")
        try:
            tensors, meta = safetensors.read(str(file), mapped=True)
            piece_scalars = json.loads(meta.get("scalars", "{}"))
        except (safetensors.SafetensorsError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{file}: {exc}") from None
        for key, values in tensors.items():
            what, _, where = key.rpartition("/")
            name, _, start_text = where.rpartition("@")
            if name in buffers and not what:  # whole, in its own dtype
                if values.size != int(np.prod(buffers[name])):
                    raise CheckpointError(f"{file}: buffer {name!r} has {values.size} elements")
                model[name] = values.reshape(buffers[name]).copy()
                continue
            if name not in index or not start_text.isdigit():
                raise CheckpointError(f"{file}: tensor {key!r} names no parameter of the model")
            start, n = int(start_text), values.size
            whole = model[name]
            if start + n > whole.size:
                raise CheckpointError(f"{file}: {key!r} runs past {name}'s {whole.size}")
            if not what:
                whole.add(start, values)
                for k, v in piece_scalars.get(key, {}).items():
                    scalars.setdefault(str(index[name]), {})[k] = v
            else:
                optimizer.setdefault(f"{index[name]}.{what}", Assembled(whole.shape)).add(
                    start, values
                )
    gaps = [n for n, _ in params if model[n].covered() != model[n].size]
    gaps += [n for n in buffers if n not in model]
    if gaps:
        raise CheckpointError(f"{path}: the shards do not cover parameters {gaps[:4]}")
    state.setdefault("optimizer", {})["scalars"] = scalars
    if lazy:
        return {"model": model, "optimizer": dict(optimizer)}
    return {
        "model": {n: np.asarray(v) for n, v in model.items()},
        "optimizer": {k: np.asarray(v) for k, v in optimizer.items()},
    }
