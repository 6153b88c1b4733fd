"""Type stubs for the Rust extension ``moecore._core`` (hand-written; checked by stubtest)."""

from typing import Any, final

import numpy as np
import numpy.typing as npt

class PoolMisuse(ValueError): ...
class PoolOutOfMemory(MemoryError): ...
class CorruptPayload(ValueError): ...
class InternalError(RuntimeError): ...

def build_info() -> dict[str, Any]: ...

# -- optim ----------------------------------------------------------------------------------
def adamw_step(
    params: list[Any],
    grads: list[Any],
    exp_avgs: list[Any],
    exp_avg_sqs: list[Any],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None: ...

# MoE kernels (rust/py/moe.rs); documented in moecore.moe_kernels.

def moe_route(
    logits: np.ndarray,
    k: int,
    score: str = "softmax",
    bias: np.ndarray | None = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def moe_route_backward(
    d_weights: np.ndarray,
    expert_idx: np.ndarray,
    probs: np.ndarray,
    score: str = "softmax",
    normalize: bool = True,
) -> np.ndarray: ...
def moe_permute(
    x: np.ndarray,
    expert_idx: np.ndarray,
    n_experts: int,
    capacity: int | None = None,
    weights: np.ndarray | None = None,
    pad_to: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def moe_unpermute(
    y_sorted: np.ndarray, order: np.ndarray, weights: np.ndarray | None, n_tokens: int, k: int
) -> np.ndarray: ...
def moe_permute_backward(
    dx_sorted: np.ndarray, order: np.ndarray, n_tokens: int, k: int
) -> np.ndarray: ...
def moe_unpermute_backward(
    dy: np.ndarray, y_sorted: np.ndarray, order: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]: ...
def moe_grouped_matmul(x_sorted: np.ndarray, counts: np.ndarray, w: np.ndarray) -> np.ndarray: ...
def moe_grouped_matmul_dx(dy: np.ndarray, counts: np.ndarray, w: np.ndarray) -> np.ndarray: ...
def moe_grouped_matmul_dw(
    x_sorted: np.ndarray, dy: np.ndarray, counts: np.ndarray
) -> np.ndarray: ...

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

# -- fused dense kernels (rust/py/fused.rs) ---------------------------------------------------
def fused_attention_forward(
    qkv: np.ndarray, heads: int, causal: bool
) -> tuple[np.ndarray, np.ndarray]: ...
def fused_attention_backward(
    qkv: np.ndarray, probs: np.ndarray, d_out: np.ndarray, heads: int, causal: bool
) -> np.ndarray: ...
def fused_gelu(x: np.ndarray) -> np.ndarray: ...
def fused_gelu_backward(g: np.ndarray, x: np.ndarray) -> np.ndarray: ...
