"""Shape arithmetic the primitives share: broadcasting undone, axes normalised."""

from __future__ import annotations

from typing import Any

from moecore.backend import is_bf16, widen_bf16


def unbroadcast(grad: Any, shape: tuple[int, ...]) -> Any:
    """Sums ``grad`` over the axes broadcasting added or stretched, back to ``shape``."""
    if grad.shape == shape:
        return grad
    if is_bf16(grad.dtype):
        # summed in float32, which is also where a parameter's gradient (the usual
        # broadcast operand) accumulates; numpy's bf16 reductions are slow
        grad = widen_bf16(grad)
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def shape_of(x: Any) -> tuple[int, ...]:
    """Shape of an array or a Python scalar (``()``)."""
    return tuple(getattr(x, "shape", ()))


def normalize_axes(axis: Any, ndim: int) -> tuple[int, ...] | None:
    """``axis`` (None, int or sequence, negatives allowed) as a sorted tuple of positives."""
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor of {ndim} dimensions")
        out.append(a % ndim)
    return tuple(sorted(set(out)))
