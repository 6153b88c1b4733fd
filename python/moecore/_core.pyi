"""Type stubs for the Rust extension ``moecore._core`` (hand-written; checked by stubtest)."""

from typing import Any

import numpy as np
import numpy.typing as npt
from typing_extensions import final

class PoolMisuse(ValueError): ...
class PoolOutOfMemory(MemoryError): ...
class CorruptPayload(ValueError): ...
class InternalError(RuntimeError): ...

def build_info() -> dict[str, Any]: ...

# ---- block-sparse matmul (rust/py/sparse.rs) ----

@final
class BsrPattern:
    def __new__(
        cls,
        shape: tuple[int, int],
        block: int,
        indptr: npt.NDArray[np.int64],
        indices: npt.NDArray[np.int64],
    ) -> BsrPattern: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def block(self) -> int: ...
    @property
    def nnzb(self) -> int: ...

def bsr_linear(
    x: npt.NDArray[np.float32],
    pattern: BsrPattern,
    data: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def bsr_linear_dx(
    dy: npt.NDArray[np.float32], pattern: BsrPattern, data: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]: ...
def bsr_linear_dw(
    dy: npt.NDArray[np.float32], x: npt.NDArray[np.float32], pattern: BsrPattern
) -> npt.NDArray[np.float32]: ...
def bsr_kernel_isa() -> str: ...
