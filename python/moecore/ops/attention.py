"""Multi-head scaled dot-product attention as one op (forward and backward fused)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore import _core
from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of


def _t(x: Any) -> Any:
    """The transpose of the last two axes, made contiguous: numpy's batched matmul falls
    back to a slow non-BLAS loop on strided operands (25× slower here)."""
    return xp_of(x).ascontiguousarray(x.swapaxes(-1, -2))


class Attention(Function):
    """``softmax(q kᵀ · scale + causal mask) v`` over ``[batch, heads, T, head_dim]``."""

    @staticmethod
    def forward(ctx: Context, q: Any, k: Any, v: Any, causal: bool = True) -> Any:
        if not (q.shape == k.shape == v.shape) or q.ndim != 4:
            raise ValueError(
                f"attention expects q, k, v of one shape [B, H, T, D], got "
                f"{q.shape}, {k.shape}, {v.shape}"
            )
        xp = xp_of(q)
        # Strided views (heads split out of a packed projection) would make numpy's batched
        # matmul skip BLAS; one contiguous copy each is far cheaper.
        q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
        scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
        s = q @ _t(k)
        s *= scale
        if causal:
            t = q.shape[2]
            # a broadcast masked copy: ~10× faster than boolean fancy indexing
            xp.copyto(s, -xp.inf, where=xp.triu(xp.ones((t, t), dtype=bool), k=1))
        s -= s.max(axis=-1, keepdims=True)
        xp.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        ctx.save_for_backward(q, k, v, s)
        ctx.scale = scale
        return s @ v

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        q, k, v, p = ctx.saved_tensors
        g = xp_of(g).ascontiguousarray(g)
        dv = _t(p) @ g
        dp = g @ _t(v)
        # dS = P ∘ (dP − rowsum(dP ∘ P)), computed in place in dp.
        dp -= (dp * p).sum(axis=-1, keepdims=True)
        dp *= p
        dp *= ctx.scale
        dq = dp @ k
        dk = _t(dp) @ q
        return dq, dk, dv


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


def _rotate_half(x: Any, sign: int = 1) -> Any:
    half = x.shape[-1] // 2
    return xp_of(x).concatenate([-sign * x[..., half:], sign * x[..., :half]], axis=-1)


def apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    """Rotates ``x [..., T, head_dim]`` by the position angles of the tables."""
    return x * cos + _rotate_half(x) * sin


def _rope_backward(g: Any, cos: Any, sin: Any) -> Any:
    # The rotation's transpose: rotate_half's transpose is rotate_half with the sign flipped.
    return g * cos + _rotate_half(g * sin, sign=-1)


def _fast(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.float32


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
        hd = d // n_heads
        # head_dim 0 (an empty projection) is left to the array-module version
        ctx.dims, ctx.causal, ctx.fast = (b, t, n_heads, d), causal, _fast(qkv) and hd > 0
        ctx.rope = None
        if rope is not None:
            cos, sin = (a[:t].astype(qkv.dtype, copy=False) for a in rope)
            ctx.rope = (cos, sin)
        if ctx.fast:
            src = np.ascontiguousarray(qkv)
            if ctx.rope is not None:
                src = src.copy()
                heads = src.reshape(b, t, 3, n_heads, hd)
                c, s_ = ctx.rope[0][:, None, :], ctx.rope[1][:, None, :]
                heads[:, :, 0] = apply_rope(heads[:, :, 0], c, s_)
                heads[:, :, 1] = apply_rope(heads[:, :, 1], c, s_)
            out, probs = _core.fused_attention_forward(src, n_heads, causal)
            ctx.save_for_backward(src, probs)
            return out
        heads = qkv.reshape(b, t, 3, n_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        out = Attention.forward(ctx, q, k, v, causal=causal)
        return out.transpose(0, 2, 1, 3).reshape(b, t, d)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        b, t, h, d = ctx.dims
        hd = d // h
        if ctx.fast:
            src, probs = ctx.saved_tensors
            d_qkv = _core.fused_attention_backward(
                src, probs, np.ascontiguousarray(g), h, ctx.causal
            )
            if ctx.rope is not None:
                c, s_ = ctx.rope[0][:, None, :], ctx.rope[1][:, None, :]
                heads = d_qkv.reshape(b, t, 3, h, hd)
                heads[:, :, 0] = _rope_backward(heads[:, :, 0], c, s_)
                heads[:, :, 1] = _rope_backward(heads[:, :, 1], c, s_)
            return d_qkv, None
        g4 = g.reshape(b, t, h, hd).transpose(0, 2, 1, 3)
        dq, dk, dv = Attention.backward(ctx, g4)
        if ctx.rope is not None:
            dq, dk = (_rope_backward(x, *ctx.rope) for x in (dq, dk))
        dqkv = xp_of(g).empty((b, t, 3, h, hd), dtype=g.dtype)
        packed = dqkv.transpose(2, 0, 3, 1, 4)
        packed[0], packed[1], packed[2] = dq, dk, dv
        return dqkv.reshape(b, t, 3 * d), None


def packed_attention(qkv: Tensor, n_heads: int, causal: bool = True, rope: Any = None) -> Tensor:
    """Multi-head attention from a packed ``[B, T, 3·D]`` projection (q, k, v concatenated
    along the last axis, each split into ``n_heads`` heads) to ``[B, T, D]``; ``rope`` is an
    optional (cos, sin) pair from :func:`rope_tables` applied to q and k."""
    return PackedCausalAttention.apply(qkv, n_heads, causal=causal, rope=rope)
