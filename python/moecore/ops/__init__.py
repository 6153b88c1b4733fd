"""Differentiable operations, one module per family.

Each op is a :class:`moecore.autograd.Function` over raw arrays; the functions here are the
public entry points, and ``Tensor`` operators (``+``, ``@``, ``.sum()``…) call them.
"""

from __future__ import annotations

from moecore.ops import tensor_methods as _tensor_methods
from moecore.ops.activation import gelu, log_softmax, silu, softmax, swiglu
from moecore.ops.attention import packed_attention, scaled_dot_product_attention
from moecore.ops.block_sparse import block_sparse_linear
from moecore.ops.checkpoint import checkpoint
from moecore.ops.dropout import dropout
from moecore.ops.elementwise import (
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
from moecore.ops.embedding import embedding
from moecore.ops.loss import cross_entropy
from moecore.ops.matmul import linear, matmul
from moecore.ops.moe import moe
from moecore.ops.norm import layer_norm, rms_norm
from moecore.ops.reduce import max, mean, sum
from moecore.ops.shape import concat, getitem, permute, reshape, stack, transpose

_tensor_methods.install()

__all__ = [
    "add",
    "block_sparse_linear",
    "cast",
    "checkpoint",
    "concat",
    "cross_entropy",
    "div",
    "dropout",
    "embedding",
    "exp",
    "gelu",
    "getitem",
    "layer_norm",
    "linear",
    "log",
    "log_softmax",
    "packed_attention",
    "rms_norm",
    "scaled_dot_product_attention",
    "silu",
    "softmax",
    "swiglu",
    "matmul",
    "max",
    "mean",
    "moe",
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
    "transpose",
]
