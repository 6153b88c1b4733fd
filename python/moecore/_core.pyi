"""Type stubs for the Rust extension ``moecore._core`` (hand-written; checked by stubtest)."""

from collections.abc import Iterable, Sequence
from typing import Any, Self, final

import numpy as np
import numpy.typing as npt
from numpy.typing import DTypeLike, NDArray
from typing_extensions import disjoint_base

class PoolMisuse(ValueError): ...
class PoolOutOfMemory(MemoryError): ...
class CorruptPayload(ValueError): ...
class NonFiniteGradient(ValueError): ...
class InternalError(RuntimeError): ...
class SchedulerMisuse(ValueError): ...

def build_info() -> dict[str, Any]: ...
def kernel_cache_info() -> dict[str, int]: ...
def kernel_cache_release() -> None: ...
def kernel_cache_set_limit(limit_bytes: int) -> None: ...
def cuda_sources() -> dict[str, str]: ...
def _panic_for_tests(message: str, in_worker: bool = False) -> None: ...

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
    compute_copies: list[Any] | None = None,
) -> None: ...

# bf16 kernels (rust/py/bf16.rs): bf16 arrays as uint16 views; documented in
# moecore.kernels.bf16 and moecore.kernels.moe_bf16.

def bf16_matmul(a: np.ndarray, b: np.ndarray, transpose_b: bool = False) -> np.ndarray: ...
def moe_grouped_matmul_bf16(
    x_sorted: np.ndarray, counts: np.ndarray, w: np.ndarray
) -> np.ndarray: ...
def moe_grouped_matmul_dx_bf16(dy: np.ndarray, counts: np.ndarray, w: np.ndarray) -> np.ndarray: ...
def moe_grouped_matmul_dw_bf16(
    x_sorted: np.ndarray, dy: np.ndarray, counts: np.ndarray
) -> np.ndarray: ...
def moe_gelu_ffn_bf16(
    x_sorted: np.ndarray, counts: np.ndarray, w1: np.ndarray, w2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def moe_gelu_ffn_backward_bf16(
    x_sorted: np.ndarray,
    counts: np.ndarray,
    w1: np.ndarray,
    w2: np.ndarray,
    h: np.ndarray,
    a: np.ndarray,
    d_y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def fused_norm_forward_bf16(
    x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float, center: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def fused_norm_backward_bf16(
    g: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None,
    eps: float,
    center: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]: ...
def fused_attention_forward_bf16(
    qkv: np.ndarray, heads: int, causal: bool
) -> tuple[np.ndarray, np.ndarray]: ...
def fused_attention_backward_bf16(
    qkv: np.ndarray, probs: np.ndarray, d_out: np.ndarray, heads: int, causal: bool
) -> np.ndarray: ...

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
def moe_gelu_ffn(
    x_sorted: np.ndarray, counts: np.ndarray, w1: np.ndarray, w2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def moe_gelu_ffn_backward(
    x_sorted: np.ndarray,
    counts: np.ndarray,
    w1: np.ndarray,
    w2: np.ndarray,
    h: np.ndarray,
    a: np.ndarray,
    d_y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def moe_router_logits(x: np.ndarray, router_w: np.ndarray) -> np.ndarray: ...
def moe_router_backward(
    d_logits: np.ndarray, x: np.ndarray, router_w: np.ndarray, d_x: np.ndarray
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
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def bsr_linear_dx(
    dy: npt.NDArray[np.float32],
    pattern: BsrPattern,
    data: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def bsr_linear_dw(
    dy: npt.NDArray[np.float32],
    x: npt.NDArray[np.float32],
    pattern: BsrPattern,
    out: npt.NDArray[np.float32] | None = None,
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
def fused_norm_forward(
    x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float, center: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
def fused_norm_backward(
    g: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
    weight: np.ndarray | None,
    eps: float,
    center: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]: ...
def fused_gelu_backward(g: np.ndarray, x: np.ndarray) -> np.ndarray: ...

# ---- memory pool (rust/py/pool.rs) ----------------------------------------------------

@disjoint_base
class PoolCore:
    def __new__(cls, backing: str = "host", limit_bytes: int | None = None) -> Self: ...
    @property
    def limit_bytes(self) -> int | None: ...
    @property
    def backing(self) -> str: ...
    def empty(self, shape: int | Sequence[int], dtype: DTypeLike | None = None) -> NDArray[Any]: ...
    def zeros(self, shape: int | Sequence[int], dtype: DTypeLike | None = None) -> NDArray[Any]: ...
    def malloc(self, nbytes: int, stream: int = 0, alignment: int = 512) -> int: ...
    def free(self, address: int) -> None: ...
    def record_stream(self, address: int, stream: int) -> None: ...
    def synchronize(self) -> None: ...
    def empty_cache(self) -> int: ...
    def reset_peak_stats(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def snapshot(self) -> list[dict[str, Any]]: ...
    def register_arena(self, base: int, size: int) -> None: ...
    def unregister_arena(self, base: int) -> None: ...

def pool_replay(trace: Iterable[Sequence[Any]]) -> dict[str, Any]: ...
def pool_random_trace(
    n_allocations: int,
    min_size: int = 1024,
    max_size: int = 67108864,
    max_live_bytes: int = 16777216000,
    seed: int = 0,
) -> list[tuple[Any, ...]]: ...

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
def compress_topk_pieces(
    pieces: list[npt.NDArray[np.float32]],
    k: int,
    residual: npt.NDArray[np.float32],
    *,
    method: str = "sampled",
    seed: int = 0,
    exact_k: bool = True,
    index: str = "auto",
    values: str = "f32",
    chunk: int = 256,
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
    payloads: list[npt.NDArray[np.uint8]],
    out: npt.NDArray[np.float32],
    *,
    scale: float = 1.0,
    overwrite: bool = False,
) -> None: ...

# -- comm -----------------------------------------------------------------------------------
@final
class CommScheduler:
    def __new__(
        cls,
        grads: Sequence[tuple[str, int, str, int, int]],
        *,
        world: int,
        first_bucket_bytes: int = 1048576,
        cap_bytes: int = 26214400,
        policy: str = "fifo",
        partition_bytes: int = 4194304,
        credit_bytes: int = 16777216,
        compress_ratio: float | None = None,
        warmup_steps: int = 0,
        compress_when: str = "auto",
        split_layers: bool = False,
    ) -> Self: ...
    @property
    def step(self) -> int: ...
    @property
    def rebuilt(self) -> bool: ...
    @property
    def in_step(self) -> bool: ...
    def buckets(self) -> list[dict[str, Any]]: ...
    def transports(self) -> list[str]: ...
    def ops(self) -> list[tuple[int, int, int, int, int, int, int]]: ...
    def begin_step(self) -> None: ...
    def ready(self, index: int) -> list[tuple[str, int, int, int, int, str]]: ...
    def finish(self) -> list[tuple[str, int, int, int, int, str]]: ...
    def unready(self) -> list[int]: ...
    def observed_order(self) -> list[int] | None: ...
    def rebuild(self, order: Sequence[int]) -> None: ...

def comm_simulate(
    scheduler: CommScheduler,
    *,
    forward_s: float,
    ready_order: Sequence[int],
    backward_s: Sequence[float],
    optimizer_s: float,
    ranks_per_node: int,
    intra_latency_s: float,
    intra_bytes_per_s: float,
    inter_latency_s: float,
    inter_bytes_per_s: float,
    hierarchical: bool = False,
    compress_s_per_elem: float = 0.0,
    decode_s_per_entry: float = 0.0,
    copy_s_per_byte: float = 0.0,
    fault_s_per_byte: float = 0.0,
    zero: int = 0,
    units: Sequence[tuple[Sequence[int], float]] = ...,
) -> dict[str, Any]: ...

# -- pipeline schedules (rust/py/pipeline.rs) ----------------------------------------------
def pipeline_schedule(
    kind: str, ranks: int, micro_batches: int, virtual_stages: int = 1
) -> dict[str, Any]: ...
def pipeline_simulate(
    kind: str,
    ranks: int,
    micro_batches: int,
    forward_s: Sequence[float],
    backward_s: Sequence[float],
    *,
    virtual_stages: int = 1,
    latency_s: float = 0.0,
    transfer_s: float = 0.0,
) -> dict[str, Any]: ...
