"""Normalisation kernels on arrays over the last axis: LayerNorm (``center=True``) and RMSNorm
(``center=False``, no bias), each with its backward.

Two implementations (:mod:`moecore.kernels.registry` chooses, :func:`norm_kernels` for given
arrays): :class:`RustNorm`, one pass each way in ``moecore._core`` (float32 numpy, 1-D
parameters), and :class:`ArrayNorm`, array-module operations (numpy or CuPy, any float
dtype). ``forward`` returns the output and what ``backward`` needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import _core
from moecore.backend import is_bf16, xp_of
from moecore.kernels.registry import select_for


def _rows(x: Any) -> Any:
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]))


class RustNorm:
    """LayerNorm or RMSNorm through one Rust pass each way (float32 CPU)."""

    @staticmethod
    def accepts(x: Any, *params: Any) -> bool:
        """Whether the Rust kernel takes these arrays: numpy, ``x`` at least 1-D, 1-D
        parameters."""
        return (
            type(x) is np.ndarray
            and x.ndim >= 1
            and all(p is None or (type(p) is np.ndarray and p.ndim == 1) for p in params)
        )

    @staticmethod
    def forward(
        x: Any, weight: Any, bias: Any, eps: float, center: bool
    ) -> tuple[Any, tuple[Any, ...]]:
        """The normalised ``x`` and what :meth:`backward` needs."""
        x2 = _rows(x)
        w = None if weight is None else np.ascontiguousarray(weight)
        b = None if bias is None else np.ascontiguousarray(bias)
        out, mean, rstd = _core.fused_norm_forward(x2, w, b, float(eps), center)
        return out.reshape(x.shape), (x2, mean, rstd, w, x.shape, float(eps), center)

    @staticmethod
    def backward(
        g: Any, saved: tuple[Any, ...], need_x: bool, need_w: bool, need_b: bool
    ) -> tuple[Any, Any, Any]:
        """``(dx, dw, db)``; the Rust kernel always computes ``dx``."""
        x2, mean, rstd, w, shape, eps, center = saved
        g2 = np.ascontiguousarray(g.reshape(x2.shape), dtype=np.float32)
        dx, dw, db = _core.fused_norm_backward(
            g2, x2, mean, rstd, w, eps, center, bool(need_w), bool(need_b)
        )
        return dx.reshape(shape), dw, db


class ArrayNorm:
    """LayerNorm and RMSNorm in array-module operations."""

    @staticmethod
    def forward(
        x: Any, weight: Any, bias: Any, eps: float, center: bool
    ) -> tuple[Any, tuple[Any, ...]]:
        """As :meth:`RustNorm.forward`."""
        xp = xp_of(x)
        if not center:
            rrms = (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)).astype(
                x.dtype, copy=False
            )
            xhat = x * rrms
            out = xhat * weight if weight is not None else xhat
            return out, (xhat, rrms, weight, center)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=-1, keepdims=True)
        rstd = (1.0 / xp.sqrt(var + eps)).astype(x.dtype, copy=False)
        xhat = centered * rstd
        out = xhat * weight if weight is not None else xhat.copy()
        if bias is not None:
            out += bias
        return out, (xhat, rstd, weight, center)

    @staticmethod
    def backward(
        g: Any, saved: tuple[Any, ...], need_x: bool, need_w: bool, need_b: bool
    ) -> tuple[Any, Any, Any]:
        """As :meth:`RustNorm.backward`; ``dx`` only when ``need_x``."""
        xhat, rstd, weight, center = saved
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(axis=lead) if need_w else None
        gx = None
        n = xhat.shape[-1]
        if not center:
            if need_x:
                gh = g * weight if weight is not None else g
                gx = rstd * (gh - xhat * (gh * xhat).sum(axis=-1, keepdims=True) / n)
            return gx, gw, None
        gb = g.sum(axis=lead) if need_b else None
        if need_x:
            gh = g * weight if weight is not None else g
            gx = (
                rstd
                / n
                * (
                    n * gh
                    - gh.sum(axis=-1, keepdims=True)
                    - xhat * (gh * xhat).sum(axis=-1, keepdims=True)
                )
            )
        return gx, gw, gb


def norm_kernels(x: Any, weight: Any, bias: Any) -> Any:
    """The implementation of LayerNorm/RMSNorm for these arrays (``None`` parameters
    skipped). A bf16 ``x`` chooses alone: the parameters of a norm stay float32 in a
    low-precision run (the bf16 kernel takes float32 parameters)."""
    if is_bf16(x.dtype):
        return select_for("norm", x)
    return select_for("norm", x, weight, bias)
