"""Kernel dispatch: which implementation runs an op for a given array.

- ``cpu``: float32 numpy arrays go to the Rust kernels in ``moecore._core`` (fast path);
- ``generic``: the same math in array-module code (``xp``), for other dtypes (float64, used
  by gradient checks) and, until a dedicated kernel exists, for CuPy arrays.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def moe_kernels_for(*arrays: Any) -> ModuleType:
    """The MoE kernel module for these arrays: Rust for float32 numpy, generic otherwise."""
    if all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays):
        from moecore import moe_kernels

        return moe_kernels
    from moecore.kernels import generic

    return generic
