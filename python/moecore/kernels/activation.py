"""Activation kernels on arrays: GELU (tanh or erf form) and the expert activations of the
MoE layer (GELU, SwiGLU, ReLU), each with its backward.

Two implementations (:mod:`moecore.kernels.registry` chooses): :class:`RustActivation`, the
fused tanh-GELU of ``moecore._core`` for C-contiguous float32 numpy arrays, and
:class:`ArrayActivation`, the same math in array-module operations (numpy or CuPy, any float
dtype). :func:`gelu_forward` returns what :func:`gelu_backward` needs: ``None`` after the
Rust kernel (the backward recomputes from ``x``), the tanh or the CDF otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore import _core
from moecore.backend import xp_of
from moecore.kernels.registry import select_for

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def erf(x: Any) -> Any:
    """Elementwise error function (numpy has none): Abramowitz & Stegun 7.1.26, |error| ≤
    1.5e-7, enough for float32 GELU."""
    xp = xp_of(x)
    s = xp.sign(x)
    a = xp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return (s * (1.0 - poly * xp.exp(-a * a))).astype(x.dtype, copy=False)


class ArrayActivation:
    """GELU in array-module operations (numpy or CuPy, any float dtype)."""

    @staticmethod
    def gelu_forward(x: Any, approximate: str) -> tuple[Any, Any]:
        """GELU of ``x`` and what its backward needs."""
        xp = xp_of(x)
        if approximate == "tanh":
            inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
            t = xp.tanh(inner)
            return 0.5 * x * (1.0 + t), t
        cdf = 0.5 * (1.0 + erf(x * _INV_SQRT_2))
        return x * cdf, cdf

    @staticmethod
    def gelu_backward(g: Any, x: Any, saved: Any, approximate: str) -> Any:
        """Gradient of GELU given ``saved`` from :meth:`gelu_forward`."""
        xp = xp_of(x)
        if approximate == "tanh":
            t = saved
            d_inner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
            return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner)
        pdf = xp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2 * math.pi))
        return g * (saved + x * pdf)


class RustActivation:
    """The fused tanh-GELU of ``moecore._core`` (float32 numpy, C-contiguous); the erf form
    has no Rust kernel and runs :class:`ArrayActivation`'s."""

    @staticmethod
    def accepts(x: Any, *_: Any) -> bool:
        """Whether the Rust kernel takes ``x``: a C-contiguous numpy array."""
        return isinstance(x, np.ndarray) and x.flags.c_contiguous

    @staticmethod
    def gelu_forward(x: Any, approximate: str) -> tuple[Any, Any]:
        """GELU of ``x``; ``None`` as the saved state after the Rust kernel."""
        if approximate == "tanh":
            return _core.fused_gelu(x), None
        return ArrayActivation.gelu_forward(x, approximate)

    @staticmethod
    def gelu_backward(g: Any, x: Any, saved: Any, approximate: str) -> Any:
        """Gradient of GELU given ``saved`` from :meth:`gelu_forward`."""
        if approximate == "tanh" and saved is None:
            return _core.fused_gelu_backward(np.ascontiguousarray(g, dtype=x.dtype), x)
        return ArrayActivation.gelu_backward(g, x, saved, approximate)


def gelu_forward(x: Any, approximate: str) -> tuple[Any, Any]:
    """GELU of ``x`` (``approximate`` ``"tanh"`` or ``"none"``) and what
    :func:`gelu_backward` needs, by the implementation chosen for ``x``."""
    return select_for("activation", x).gelu_forward(x, approximate)


def gelu_backward(g: Any, x: Any, saved: Any, approximate: str) -> Any:
    """Gradient of GELU at ``x`` given ``saved`` from :func:`gelu_forward`."""
    # x is the array forward was given, so this is the implementation that ran it (the
    # Rust one hands arrays it saved state for to the array-module backward).
    return select_for("activation", x).gelu_backward(g, x, saved, approximate)


def activate(h: Any, activation: str) -> tuple[Any, Any]:
    """An MoE expert activation (``"gelu"`` (tanh), ``"relu"`` or ``"swiglu"``, whose input
    ``[R, 2h]`` holds the gate and the value halves) and what :func:`activate_backward`
    needs."""
    xp = xp_of(h)
    if activation == "gelu":
        return gelu_forward(h, "tanh")
    if activation == "relu":
        return h * (h > 0), None
    half = h.shape[1] // 2
    a, b = h[:, :half], h[:, half:]
    s = (0.5 * (1 + xp.tanh(0.5 * a))).astype(h.dtype, copy=False)
    return a * s * b, s


def activate_backward(g: Any, h: Any, saved: Any, activation: str) -> Any:
    """Gradient of :func:`activate` given what it saved."""
    xp = xp_of(h)
    if activation == "gelu":
        return gelu_backward(g, h, saved, "tanh").astype(h.dtype, copy=False)
    if activation == "relu":
        return g * (h > 0)
    half = h.shape[1] // 2
    a, b, s = h[:, :half], h[:, half:], saved
    return xp.concatenate([g * b * s * (1 + a * (1 - s)), g * a * s], axis=1)
