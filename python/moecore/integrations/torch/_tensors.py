"""Crossing between torch tensors and the arrays moecore's kernels take, without copies."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moecore.backend import as_array

#: The dtypes moecore's kernels take: float32 (the Rust/CUDA kernels) and float64 (the
#: array-module kernels, for gradient checks).
FLOAT_DTYPES = (torch.float32, torch.float64)


def check_input(x: Any, name: str, like: torch.Tensor, last_dim: int | None = None) -> None:
    """Raises, naming ``name``, unless ``x`` is a contiguous tensor on ``like``'s device with
    ``like``'s dtype (and ``last_dim`` features): what the kernels can read in place."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.device != like.device:
        raise ValueError(
            f"{name}: expected a tensor on {like.device} (where the weights are), got {x.device}"
        )
    if x.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the weights' dtype), got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous tensor (the kernels read it in place), got strides "
            f"{tuple(x.stride())} for shape {tuple(x.shape)}; call .contiguous()"
        )
    if last_dim is not None and (x.dim() == 0 or x.shape[-1] != last_dim):
        raise ValueError(f"{name}: expected shape (..., {last_dim}), got {tuple(x.shape)}")


def check_float_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if the kernels take it, else a TypeError naming it."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    return dtype


def to_array(t: torch.Tensor, name: str) -> Any:
    """``t``'s memory as a numpy (CPU) or CuPy (CUDA) array, no copy."""
    return as_array(t.detach(), name, gpu=True)


def to_tensor(a: Any) -> torch.Tensor:
    """A kernel's result as a tensor sharing its memory (a numpy array torch cannot take as
    it is — read-only or negatively strided — is copied first)."""
    if isinstance(a, np.ndarray) and not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a, order="C")
    return torch.from_dlpack(a)
