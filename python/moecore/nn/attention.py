"""Multi-head causal self-attention."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import ops
from moecore.autograd.tensor import Tensor
from moecore.nn.gating import attention_gate
from moecore.nn.init import GPT2_STD
from moecore.nn.layers import Dropout, Linear
from moecore.nn.module import Module
from moecore.ops.attention import rope_tables


class Attention(Module):
    """Causal multi-head self-attention: a packed q/k/v projection, one fused attention op,
    and an output projection.

    Args:
        d_model: model width (divisible by ``n_heads``).
        n_heads: number of heads.
        bias: learn biases in the projections.
        dropout: dropout on the output projection.
        causal: mask future positions.
        rope: rotary position embeddings on q and k (RoFormer), for up to ``max_len`` positions.
        max_len: longest sequence the rotary tables cover.
        init: ``"gpt2"`` or ``"torch"`` (see :class:`Linear`).
        out_std: std of the output projection under ``"gpt2"`` (it writes into the residual
            stream: a model passes ``nn.init.residual_std(n_layers)``); default 0.02.
        gate: ``"dao"``: the dynamic attention gate ``g = sigmoid(Linear(d_model → 1)(x))``
            multiplies each position's query, so that query's attention logits, before the
            softmax (:func:`moecore.nn.gating.attention_gate`); None: no gate.

    Shape:
        ``[batch, T, d_model]`` → same.

    Examples:
        >>> Attention(16, 4)(moecore.randn(2, 5, 16)).shape
        (2, 5, 16)
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        bias: bool = False,
        dropout: float = 0.0,
        causal: bool = True,
        rope: bool = False,
        max_len: int = 2048,
        dtype: Any = np.float32,
        init: str = "gpt2",
        out_std: float = GPT2_STD,
        gate: str | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if gate not in (None, "dao"):
            raise ValueError(f"gate must be None or 'dao', got {gate!r}")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, causal
        self.qkv = Linear(d_model, 3 * d_model, bias=bias, dtype=dtype, init=init)
        self.proj = Linear(d_model, d_model, bias=bias, dtype=dtype, init=init, std=out_std)
        self.dropout = Dropout(dropout)
        self.rope = rope_tables(max_len, d_model // n_heads) if rope else None
        self.gate = Linear(d_model, 1, bias=True, dtype=dtype, init=init) if gate else None

    def forward(self, x: Tensor) -> Tensor:
        """Attends each position to itself and the positions before it."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Attention expects [batch, T, {self.d_model}], got {x.shape}")
        if self.rope is not None and x.shape[1] > self.rope[0].shape[0]:
            raise ValueError(
                f"sequence of {x.shape[1]} exceeds the rotary tables ({self.rope[0].shape[0]})"
            )
        qkv = self.qkv(x)
        if self.gate is not None:
            d = self.d_model
            qkv = ops.concat([qkv[..., :d] * attention_gate(self.gate, x), qkv[..., d:]], axis=-1)
        h = ops.packed_attention(qkv, self.n_heads, causal=self.causal, rope=self.rope)
        return self.dropout(self.proj(h))

    def extra_repr(self) -> str:
        gate = ", gate=dao" if self.gate is not None else ""
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, "
            f"rope={self.rope is not None}{gate}"
        )
