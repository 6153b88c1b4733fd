"""The safetensors format (8-byte little-endian header length, a JSON header, raw
little-endian tensor bytes), written and read with numpy alone, so PyTorch users can load
moecore weights with ``safetensors.torch.load_file`` and moecore needs no extra package."""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import IO, Any

import numpy as np

from moecore.errors import SafetensorsError

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES_BY_STR = {v.str: k for k, v in _DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def write(
    fh: IO[bytes], tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Writes ``tensors`` (name → numpy array) to the open binary file ``fh``."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = _CODES_BY_STR.get(a.dtype.str)
        if code is None:
            raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} cannot be stored")
        header[name] = {
            "dtype": code,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for a in arrays:
        fh.write(memoryview(a.reshape(-1)).cast("B"))  # type: ignore[arg-type]  # ndarray is a buffer; numpy stubs lack __buffer__


def _dimension(value: object) -> int:
    """A shape entry or offset: a JSON integer ≥ 0 (ValueError/TypeError otherwise)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not an integer ≥ 0")
    return value


def read(path: str, mapped: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file → (tensors, metadata); raises :class:`SafetensorsError`
    naming the file and the problem.

    With ``mapped`` the file is memory-mapped and the tensors are read-only views of it:
    nothing is read until used, so a caller that needs a slice of a tensor (a rank resuming
    its shard) never holds the rest. Without it they are owned, writable copies."""
    data: Any
    with open(path, "rb") as fh:
        if mapped and os.fstat(fh.fileno()).st_size > 0:
            # The mapping outlives the file object; the arrays keep it alive.
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            data = fh.read()
    if len(data) < 8:
        raise SafetensorsError(f"{path}: truncated ({len(data)} bytes, no header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise SafetensorsError(f"{path}: header length {n} exceeds the file ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ is not a map of strings")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, entry in header.items():
        try:
            dt = _DTYPES[entry["dtype"]]
            shape = tuple(_dimension(s) for s in entry["shape"])
            start, end = (_dimension(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has a malformed entry ({exc!r})"
            ) from None
        count = math.prod(shape)  # Python ints: no overflow on absurd shapes
        if not 0 <= start <= end <= len(body) or end - start != count * dt.itemsize:
            raise SafetensorsError(
                f"{path}: tensor {name!r} claims bytes [{start}, {end}) for shape {shape} "
                f"{entry['dtype']}, but the data section has {len(body)} bytes"
            )
        try:
            view = np.frombuffer(body[start:end], dtype=dt).reshape(shape)
            out[name] = view if mapped else view.copy()
        except ValueError as exc:  # a shape numpy cannot make (e.g. [0, 2**63 - 1])
            raise SafetensorsError(f"{path}: tensor {name!r} shape {shape}: {exc}") from None
    return out, metadata
