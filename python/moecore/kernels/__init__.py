"""Kernel dispatch: which implementation runs an op for a given array.

- ``cpu``: float32 numpy arrays go to the Rust kernels in ``moecore._core`` (fast path);
- ``cuda.moe_kernels``: float32 CuPy arrays go to the CUDA kernels of ``cuda/`` (host code in
  :mod:`moecore.kernels.cuda`) and CuPy's cuBLAS matmuls;
- ``generic``: the same math in array-module code (``xp``), for other dtypes (float64, used
  by gradient checks, on numpy or CuPy).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from moecore.backend import is_cupy_array


def moe_kernels_for(*arrays: Any) -> ModuleType:
    """The MoE kernel module for these arrays: Rust for float32 numpy, CUDA for float32 CuPy,
    generic otherwise."""
    if all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays):
        from moecore import moe_kernels

        return moe_kernels
    if all(is_cupy_array(a) and a.dtype == np.float32 for a in arrays):
        from moecore.kernels.cuda import moe_kernels as cuda_moe_kernels

        return cuda_moe_kernels
    from moecore.kernels import generic

    return generic
