"""Differentiable operations, one module per family.

Each op is a :class:`moecore.autograd.Function` over raw arrays; the functions here are the
public entry points. The coarse ops (activations, attention, norms, the MoE layer, losses…)
are defined here; the primitives ``Tensor``'s operators are made of (``add``, ``reshape``,
``sum``, ``matmul``…) live in :mod:`moecore.autograd.primitives` and are re-exported here.
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
from moecore.autograd.primitives.shape import concat, getitem, permute, reshape, stack, transpose
from moecore.ops.activation import gelu, log_softmax, silu, softmax, swiglu
from moecore.ops.attention import packed_attention, scaled_dot_product_attention
from moecore.ops.block_sparse import block_sparse_linear
from moecore.ops.checkpoint import checkpoint
from moecore.ops.dropout import dropout
from moecore.ops.embedding import embedding
from moecore.ops.loss import cross_entropy
from moecore.ops.moe import moe
from moecore.ops.norm import layer_norm, rms_norm

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
