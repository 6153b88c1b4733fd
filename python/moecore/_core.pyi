"""Type stubs for the Rust extension ``moecore._core`` (hand-written; checked by stubtest)."""

from typing import Any

import numpy as np
import numpy.typing as npt

class PoolMisuse(ValueError): ...
class PoolOutOfMemory(MemoryError): ...
class CorruptPayload(ValueError): ...
class InternalError(RuntimeError): ...

def build_info() -> dict[str, Any]: ...

# --- compress (rust/py/compress.rs) ---

def compress_select(
    grad: npt.NDArray[np.float32],
    k: int,
    *,
    method: str = "sampled",
    seed: int = 0,
    exact_k: bool = True,
) -> npt.NDArray[np.uint32]: ...
def compress_topk(
    grad: npt.NDArray[np.float32],
    k: int,
    *,
    method: str = "sampled",
    seed: int = 0,
    exact_k: bool = True,
    index: str = "auto",
    values: str = "f32",
    chunk: int = 256,
    residual: npt.NDArray[np.float32] | None = None,
    velocity: npt.NDArray[np.float32] | None = None,
    accumulator: npt.NDArray[np.float32] | None = None,
    momentum: float = 0.0,
) -> npt.NDArray[np.uint8]: ...
def compress_int8(
    grad: npt.NDArray[np.float32], *, chunk: int = 256, stochastic: bool = False, seed: int = 0
) -> npt.NDArray[np.uint8]: ...
def compress_encode(
    n: int,
    indices: npt.NDArray[np.uint32],
    values: npt.NDArray[np.float32],
    *,
    index: str = "auto",
    value_format: str = "f32",
    chunk: int = 256,
) -> npt.NDArray[np.uint8]: ...
def compress_decode(
    payload: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.float32], int]: ...
def compress_header(payload: npt.NDArray[np.uint8]) -> dict[str, Any]: ...
def compress_decompress(payload: npt.NDArray[np.uint8], n: int) -> npt.NDArray[np.float32]: ...
def compress_decompress_into(
    payload: npt.NDArray[np.uint8], out: npt.NDArray[np.float32], *, add: bool, scale: float = 1.0
) -> None: ...
def compress_decompress_sum(
    payloads: list[npt.NDArray[np.uint8]], out: npt.NDArray[np.float32], *, scale: float = 1.0
) -> None: ...
