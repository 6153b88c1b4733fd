"""Type stubs for the Rust extension ``moecore._core`` (hand-written; checked by stubtest)."""

from typing import Any

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
