"""The dense affine map ``y = x @ w.T + bias`` of a ``Linear`` layer, on 2-D arrays, and its
backward.

Two implementations (:mod:`moecore.kernels.registry` chooses, :func:`linear_kernels` for
given arrays): :class:`ArrayLinear`, array-module products (numpy's BLAS or CuPy's) for
float arrays of one dtype, and :class:`moecore.kernels.bf16.BF16Linear` for bf16 ``x`` and
``w`` (the bf16 GEMM doorway). Mixed operands — a bf16 activation with a float32 weight, or
the float32 output of a precision island with a bf16 weight — run :class:`ArrayLinear` in
float32: each bf16 operand is widened (exactly), the result is float32.
"""

from __future__ import annotations

from typing import Any

from moecore.backend import is_bf16, widen_bf16
from moecore.kernels.registry import select_for


def _wide(a: Any) -> Any:
    return widen_bf16(a) if a is not None and is_bf16(a.dtype) else a


class ArrayLinear:
    """``x @ w.T + bias`` in array-module operations; bf16 operands widened to float32."""

    @staticmethod
    def forward(x2: Any, w: Any, bias: Any) -> tuple[Any, tuple[Any, ...]]:
        """``(y, saved)`` for 2-D ``x2 [T, in]`` and ``w [out, in]``."""
        y = _wide(x2) @ _wide(w).T
        if bias is not None:
            y += _wide(bias)
        return y, (x2, w)

    @staticmethod
    def backward(
        g2: Any, saved: tuple[Any, ...], need_x: bool, need_w: bool, need_b: bool
    ) -> tuple[Any, Any, Any]:
        """``(gx, gw, gb)``, each None when not needed; float32 where an operand was bf16."""
        x2, w = saved
        g2 = _wide(g2)
        gx = g2 @ _wide(w) if need_x else None
        gw = g2.T @ _wide(x2) if need_w else None
        gb = g2.sum(axis=0) if need_b else None
        return gx, gw, gb


def linear_kernels(x2: Any, w: Any, bias: Any) -> Any:
    """The implementation of the affine map for these arrays (``bias`` may be None; it is
    not part of the choice: a float32 bias is added to a bf16 product in float32)."""
    return select_for("linear", x2, w)
