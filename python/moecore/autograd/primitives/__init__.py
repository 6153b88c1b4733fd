"""The primitive differentiable operations ``Tensor``'s operators and methods are made of.

Elementwise arithmetic and pointwise functions, reshaping and indexing, reductions and matrix
products, each a :class:`moecore.autograd.Function` over raw arrays with a functional entry
point (``add``, ``reshape``, ``sum``, ``matmul``…) that :mod:`moecore.ops` re-exports. The
coarse operations (attention, norms, the MoE layer…) live in :mod:`moecore.ops`.
"""

from __future__ import annotations

from moecore.autograd.primitives.elementwise import (
    add,
    cast,
    div,
    exp,
    log,
    mul,
    neg,
    pow,
    relu,
    sigmoid,
    sub,
    tanh,
)
from moecore.autograd.primitives.matmul import linear, matmul
from moecore.autograd.primitives.reduce import max, mean, sum
from moecore.autograd.primitives.shape import (
    concat,
    getitem,
    permute,
    reshape,
    stack,
    to_device_op,
    transpose,
)

__all__ = [
    "add",
    "cast",
    "concat",
    "div",
    "exp",
    "getitem",
    "linear",
    "log",
    "matmul",
    "max",
    "mean",
    "mul",
    "neg",
    "permute",
    "pow",
    "relu",
    "reshape",
    "sigmoid",
    "stack",
    "sub",
    "sum",
    "tanh",
    "to_device_op",
    "transpose",
]
