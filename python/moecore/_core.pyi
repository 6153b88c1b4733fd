"""Type stubs for the Rust extension ``moecore._core`` (hand-written; checked by stubtest)."""

from typing import Any

import numpy as np

class PoolMisuse(ValueError): ...
class PoolOutOfMemory(MemoryError): ...
class CorruptPayload(ValueError): ...
class InternalError(RuntimeError): ...

def build_info() -> dict[str, Any]: ...

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
