"""Dynamic attention gating ("DAO"): a learned per-position factor on the attention logits."""

from __future__ import annotations

from moecore import ops
from moecore.autograd.tensor import Tensor
from moecore.nn.module import Module


def attention_gate(gate: Module, x: Tensor) -> Tensor:
    """``g = sigmoid(gate(x))`` per position, ``[B, T, 1]`` for ``gate`` a
    ``Linear(d_model → 1)``: the caller multiplies each position's query by it, which scales
    that query's attention logits before the softmax (the numerically stable form: the
    logits only shrink, never grow)."""
    return ops.sigmoid(gate(x))
