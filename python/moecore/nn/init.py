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


#: The initialisation schemes every layer takes (``init=``): ``"gpt2"`` draws weights from
#: N(0, 0.02²) with zero biases (the layers that write into the residual stream get a
#: smaller ``std``, see :func:`residual_std`); ``"torch"`` is PyTorch's fan-in default.
INITS = ("gpt2", "torch")

#: GPT-2's standard deviation for every weight matrix and embedding.
GPT2_STD = 0.02


def check_init(scheme: str) -> None:
    """Raises ``ValueError`` unless ``scheme`` is one of :data:`INITS`."""
    if scheme not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {scheme!r}")


def weight(
    shape: tuple[int, ...], fan_in: int, scheme: str, std: float, dtype: Any = np.float32
) -> np.ndarray:
    """A weight of ``shape``: N(0, std²) for ``"gpt2"``, U(±1/sqrt(fan_in)) for ``"torch"``."""
    check_init(scheme)
    if scheme == "gpt2":
        return normal(shape, std, dtype)
    return fan_in_uniform(shape, fan_in, dtype)


def bias(shape: tuple[int, ...], fan_in: int, scheme: str, dtype: Any = np.float32) -> np.ndarray:
    """A bias of ``shape``: zeros for ``"gpt2"``, U(±1/sqrt(fan_in)) for ``"torch"``."""
    check_init(scheme)
    if scheme == "gpt2":
        return np.zeros(shape, dtype)
    return fan_in_uniform(shape, fan_in, dtype)


def residual_std(n_layers: int, std: float = GPT2_STD) -> float:
    """GPT-2's std for the projections that write into the residual stream: the stream sums
    2·n_layers of them (attention and FFN per block), so each gets std/sqrt(2·n_layers) and
    the stream's variance at the top does not grow with depth."""
    return std / math.sqrt(2 * max(n_layers, 1))
