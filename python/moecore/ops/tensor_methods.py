"""Binds the ops to ``Tensor`` as operators and methods (``x + y``, ``x.sum()``…)."""

from __future__ import annotations

from typing import Any

from moecore.autograd.tensor import Tensor
from moecore.ops import elementwise as ew
from moecore.ops import matmul as mm
from moecore.ops import reduce as rd
from moecore.ops import shape as sh


def _rsub(self: Tensor, other: Any) -> Tensor:
    return ew.add(ew.neg(self), other)


def _rdiv(self: Tensor, other: Any) -> Tensor:
    return ew.mul(ew.pow(self, -1.0), other)


def install() -> None:
    """Attaches the operator methods (called once, on import of ``moecore.ops``)."""
    methods: dict[str, Any] = {
        "__add__": ew.add,
        "__radd__": lambda self, other: ew.add(self, other),
        "__sub__": ew.sub,
        "__rsub__": _rsub,
        "__mul__": ew.mul,
        "__rmul__": lambda self, other: ew.mul(self, other),
        "__truediv__": ew.div,
        "__rtruediv__": _rdiv,
        "__neg__": ew.neg,
        "__pow__": ew.pow,
        "__matmul__": mm.matmul,
        "__getitem__": sh.getitem,
        "exp": ew.exp,
        "log": ew.log,
        "tanh": ew.tanh,
        "sigmoid": ew.sigmoid,
        "relu": ew.relu,
        "sum": rd.sum,
        "mean": rd.mean,
        "max": rd.max,
        "reshape": sh.reshape,
        "view": sh.reshape,
        "transpose": sh.transpose,
        "permute": sh.permute,
        "matmul": mm.matmul,
    }
    for name, fn in methods.items():
        setattr(Tensor, name, fn)
    Tensor.T = property(lambda self: sh.transpose(self))  # type: ignore[attr-defined]
