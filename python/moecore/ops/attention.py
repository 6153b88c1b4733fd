"""Multi-head scaled dot-product attention as one op (forward and backward fused)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.kernels.attention import apply_rope, packed_kernels, sdpa_backward, sdpa_forward

__all__ = [
    "Attention",
    "PackedCausalAttention",
    "apply_rope",
    "packed_attention",
    "rope_tables",
    "scaled_dot_product_attention",
]


class Attention(Function):
    """``softmax(q kᵀ · scale + causal mask) v`` over ``[batch, heads, T, head_dim]``."""

    @staticmethod
    def forward(ctx: Context, q: Any, k: Any, v: Any, causal: bool = True) -> Any:
        if not (q.shape == k.shape == v.shape) or q.ndim != 4:
            raise ValueError(
                f"attention expects q, k, v of one shape [B, H, T, D], got "
                f"{q.shape}, {k.shape}, {v.shape}"
            )
        out, saved = sdpa_forward(q, k, v, causal)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return sdpa_backward(g, *ctx.saved_tensors)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """Attention over ``[batch, heads, T, head_dim]`` inputs, causal by default."""
    return Attention.apply(q, k, v, causal=causal)


def rope_tables(
    seq_len: int, head_dim: int, base: float = 10000.0, dtype: Any = np.float32
) -> tuple[Any, Any]:
    """cos and sin tables ``[seq_len, head_dim]`` of rotary position embeddings (RoFormer),
    in the rotate-half layout (the two halves of each head share a frequency)."""
    inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(seq_len, dtype=np.float64), inv)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


class PackedCausalAttention(Function):
    """Attention from a packed projection ``qkv [B, T, 3·D]`` to ``out [B, T, D]``: the head
    split and merge (and rotary embeddings, if given) happen inside the op, not as extra tape
    nodes. float32 CPU arrays run the fused Rust kernel (heads read and written in place by
    strides, in the packed layouts); other dtypes and devices run the array-module version."""

    @staticmethod
    def forward(ctx: Context, qkv: Any, n_heads: int, causal: bool = True, rope: Any = None) -> Any:
        b, t, three_d = qkv.shape
        if three_d % (3 * n_heads):
            raise ValueError(
                f"qkv last dimension {three_d} is not 3 × heads ({n_heads}) × head_dim"
            )
        d = three_d // 3
        ctx.dims, ctx.causal = (b, t, n_heads, d), causal
        ctx.rope = None
        if rope is not None:
            cos, sin = (a[:t].astype(qkv.dtype, copy=False) for a in rope)
            ctx.rope = (cos, sin)
        ctx.kernels = packed_kernels(qkv, n_heads)
        out, saved = ctx.kernels.forward(qkv, n_heads, causal, ctx.rope)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return ctx.kernels.backward(g, ctx.saved_tensors, ctx.dims, ctx.causal, ctx.rope), None


def packed_attention(qkv: Tensor, n_heads: int, causal: bool = True, rope: Any = None) -> Tensor:
    """Multi-head attention from a packed ``[B, T, 3·D]`` projection (q, k, v concatenated
    along the last axis, each split into ``n_heads`` heads) to ``[B, T, D]``; ``rope`` is an
    optional (cos, sin) pair from :func:`rope_tables` applied to q and k."""
    return PackedCausalAttention.apply(qkv, n_heads, causal=causal, rope=rope)
