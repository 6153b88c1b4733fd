"""Shape and indexing ops: reshape, transpose, indexing, concatenation, device moves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from moecore.autograd.function import Context, Function, array_of
from moecore.backend import device_of, to_device, xp_of

if TYPE_CHECKING:
    from moecore.autograd.tensor import Tensor  # Tensor's methods call these


class Reshape(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, shape: tuple[int, ...]) -> Any:
        ctx.shape = a.shape
        return a.reshape(shape)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g.reshape(ctx.shape), None


class Transpose(Function):
    """Permutes axes (``axes`` as in ``numpy.transpose``)."""

    @staticmethod
    def forward(ctx: Context, a: Any, axes: tuple[int, ...] | None) -> Any:
        axes = tuple(range(a.ndim))[::-1] if axes is None else tuple(ax % a.ndim for ax in axes)
        if sorted(axes) != list(range(a.ndim)):
            raise ValueError(f"axes {axes} are not a permutation of {a.ndim} dimensions")
        ctx.inverse = tuple(sorted(range(len(axes)), key=axes.__getitem__))
        return a.transpose(axes)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g.transpose(ctx.inverse), None


class GetItem(Function):
    """``a[index]`` with basic or advanced indexing; backward scatters (adds) into zeros."""

    @staticmethod
    def forward(ctx: Context, a: Any, index: Any) -> Any:
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        out = a[index]
        return out if hasattr(out, "shape") else xp_of(a).asarray(out)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        xp = xp_of(g)
        out = xp.zeros(ctx.shape, dtype=ctx.dtype)
        if _is_basic(ctx.index):
            out[ctx.index] = g  # basic indexing selects each element at most once
        else:
            xp.add.at(out, ctx.index, g)  # repeated indices must add up
        return out, None


def _is_basic(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, int | slice) or p is None or p is Ellipsis for p in parts)


class Concat(Function):
    @staticmethod
    def forward(ctx: Context, *arrays: Any, axis: int = 0) -> Any:
        axis = axis % arrays[0].ndim
        ctx.axis = axis
        ctx.splits = [a.shape[axis] for a in arrays]
        return xp_of(arrays[0]).concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        out, start = [], 0
        for n in ctx.splits:
            index = [slice(None)] * g.ndim
            index[ctx.axis] = slice(start, start + n)
            out.append(g[tuple(index)])
            start += n
        return tuple(out)


class ToDevice(Function):
    @staticmethod
    def forward(ctx: Context, a: Any, device: str) -> Any:
        ctx.device = device_of(a)
        return to_device(a, device)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return to_device(g, ctx.device), None


def _unpack(args: tuple[int | Sequence[int], ...]) -> tuple[int, ...]:
    """Dimensions given inline or as one tuple/list: ``f(2, 3)`` or ``f((2, 3))``."""
    if len(args) == 1 and isinstance(args[0], tuple | list):
        return tuple(args[0])
    return cast("tuple[int, ...]", args)


def reshape(a: Tensor, *shape: int | Sequence[int]) -> Tensor:
    """``a`` with a new shape (one dimension may be -1)."""
    return Reshape.apply(a, tuple(int(s) for s in _unpack(shape)))


def transpose(a: Tensor, *axes: int | Sequence[int]) -> Tensor:
    """Permutes axes; with two axes swaps just those (PyTorch's ``transpose(d0, d1)``); with
    none reverses them."""
    dims = _unpack(axes)
    if len(dims) == 2:
        perm = list(range(a.ndim))
        i, j = dims[0] % a.ndim, dims[1] % a.ndim
        perm[i], perm[j] = perm[j], perm[i]
        return Transpose.apply(a, tuple(perm))
    return Transpose.apply(a, dims if dims else None)


def permute(a: Tensor, *axes: int | Sequence[int]) -> Tensor:
    """Reorders all axes (PyTorch's ``permute``)."""
    return Transpose.apply(a, _unpack(axes))


def getitem(a: Tensor, index: Any) -> Tensor:
    """``a[index]``; Tensor indices are used by value."""
    if isinstance(index, tuple):
        index = tuple(array_of(i) for i in index)
    else:
        index = array_of(index)
    return GetItem.apply(a, index)


def concat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Joins tensors along an existing axis."""
    if not tensors:
        raise ValueError("concat needs at least one tensor")
    return Concat.apply(*tensors, axis=axis)


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Joins tensors along a new axis."""
    if not tensors:
        raise ValueError("stack needs at least one tensor")
    ndim = tensors[0].ndim + 1
    axis = axis % ndim
    expanded = [reshape(t, (*t.shape[:axis], 1, *t.shape[axis:])) for t in tensors]
    return concat(expanded, axis=axis)


def to_device_op(a: Tensor, device: str) -> Tensor:
    """``a`` copied to ``device``; the gradient flows back to the original device."""
    return ToDevice.apply(a, device)
