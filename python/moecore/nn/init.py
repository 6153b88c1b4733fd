"""Parameter initialisers, drawing from the default generator (``moecore.manual_seed``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore.autograd.random import generator


def uniform(shape: tuple[int, ...], bound: float, dtype: Any = np.float32) -> np.ndarray:
    """Samples from U(-bound, bound)."""
    return generator("cpu").uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape: tuple[int, ...], std: float, dtype: Any = np.float32) -> np.ndarray:
    """Samples from N(0, std²)."""
    return (generator("cpu").standard_normal(shape) * std).astype(dtype)


def fan_in_uniform(shape: tuple[int, ...], fan_in: int, dtype: Any = np.float32) -> np.ndarray:
    """PyTorch's default for Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform(shape, 1.0 / math.sqrt(max(fan_in, 1)), dtype)
