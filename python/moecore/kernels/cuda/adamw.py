"""The fused AdamW step: the host code of ``cuda/adamw.cu``."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.kernels.cuda.launch import (
    INT_MAX,
    THREADS,
    Backend,
    check_array,
    i32,
    launch_grid,
    resolve_backend,
)


def adamw_scalars(
    lr: float, beta1: float, beta2: float, weight_decay: float, step: int
) -> tuple[np.float32, np.float32, np.float32]:
    """``(step_size, inv_sqrt_bc2, decay)`` computed in float32 as the CPU kernel does."""
    f = np.float32
    t = min(step, INT_MAX)
    bc1 = f(1.0) - f(_powi(float(f(beta1)), t))
    bc2 = f(1.0) - f(_powi(float(f(beta2)), t))
    step_size = f(lr) / bc1
    inv_sqrt_bc2 = f(1.0) / np.sqrt(bc2)
    decay = f(1.0) - f(lr) * f(weight_decay)
    return f(step_size), f(inv_sqrt_bc2), f(decay)


def _powi(b: float, e: int) -> float:
    """``b ** e`` by binary powering in float64, like LLVM's ``powi``."""
    result = 1.0
    while e:
        if e & 1:
            result *= b
        b *= b
        e >>= 1
    return result


def adamw_step(
    p: Any,
    g: Any,
    m: Any,
    v: Any,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    backend: Backend | None = None,
) -> None:
    """One fused AdamW step on one tensor, in place (``p``, ``m``, ``v`` updated)."""
    be = resolve_backend(backend)
    arrays = [
        check_array(be, a, name, np.float32) for a, name in ((p, "p"), (g, "g"), (m, "m"), (v, "v"))
    ]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"p, g, m, v sizes differ: {[a.size for a in arrays]}")
    if step < 1:
        raise ValueError(f"step must be at least 1, got {step}")
    step_size, inv_sqrt_bc2, decay = adamw_scalars(lr, beta1, beta2, weight_decay, step)
    n = int(arrays[0].size)
    if n:
        be.launch(
            "adamw",
            "adamw_step",
            (launch_grid(n),),
            (THREADS,),
            *arrays,
            i32(n),
            np.float32(beta1),
            np.float32(beta2),
            np.float32(eps),
            step_size,
            inv_sqrt_bc2,
            decay,
        )
