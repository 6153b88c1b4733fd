"""Attention kernels on arrays: scaled dot-product attention over ``[B, H, T, D]`` heads, and
attention straight from a packed projection ``qkv [B, T, 3·D]`` (with optional rotary
embeddings), each with its backward.

Two implementations of the packed form (:func:`packed_kernels` chooses, through
:mod:`moecore.kernels.registry`): :class:`RustAttention`, the fused kernel of
``moecore._core`` (float32 numpy; heads read and written in place by strides, in the packed
layouts), and :class:`ArrayAttention`, array-module operations (numpy or CuPy, any float
dtype). ``forward`` returns the output and the arrays its ``backward`` needs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore import _core
from moecore.backend import xp_of
from moecore.kernels.registry import array_module_implementation, select_for


def _t(x: Any) -> Any:
    """The transpose of the last two axes, made contiguous: numpy's batched matmul falls
    back to a slow non-BLAS loop on strided operands (25× slower here)."""
    return xp_of(x).ascontiguousarray(x.swapaxes(-1, -2))


def sdpa_forward(q: Any, k: Any, v: Any, causal: bool) -> tuple[Any, tuple[Any, ...]]:
    """``softmax(q kᵀ · scale + causal mask) v`` over ``[B, H, T, D]``; returns the output
    and ``(q, k, v, probs, scale)`` for :func:`sdpa_backward`."""
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
    return s @ v, (q, k, v, s, scale)


def sdpa_backward(g: Any, q: Any, k: Any, v: Any, p: Any, scale: Any) -> tuple[Any, Any, Any]:
    """Gradients ``(dq, dk, dv)`` of :func:`sdpa_forward` given what it returned."""
    g = xp_of(g).ascontiguousarray(g)
    dv = _t(p) @ g
    dp = g @ _t(v)
    # dS = P ∘ (dP − rowsum(dP ∘ P)), computed in place in dp.
    dp -= (dp * p).sum(axis=-1, keepdims=True)
    dp *= p
    dp *= scale
    dq = dp @ k
    dk = _t(dp) @ q
    return dq, dk, dv


def _rotate_half(x: Any, sign: int = 1) -> Any:
    half = x.shape[-1] // 2
    return xp_of(x).concatenate([-sign * x[..., half:], sign * x[..., :half]], axis=-1)


def apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    """Rotates ``x [..., T, head_dim]`` by the position angles of the tables."""
    return x * cos + _rotate_half(x) * sin


def rope_backward(g: Any, cos: Any, sin: Any) -> Any:
    """Gradient of :func:`apply_rope` with respect to ``x``."""
    # The rotation's transpose: rotate_half's transpose is rotate_half with the sign flipped.
    return g * cos + _rotate_half(g * sin, sign=-1)


class ArrayAttention:
    """Attention from a packed projection in array-module operations."""

    @staticmethod
    def forward(qkv: Any, n_heads: int, causal: bool, rope: Any) -> tuple[Any, tuple[Any, ...]]:
        """``out [B, T, D]`` and what :meth:`backward` needs; ``rope`` a (cos, sin) pair
        already cut to ``T`` rows and cast, or None."""
        b, t, three_d = qkv.shape
        d = three_d // 3
        hd = d // n_heads
        heads = qkv.reshape(b, t, 3, n_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out, saved = sdpa_forward(q, k, v, causal)
        return out.transpose(0, 2, 1, 3).reshape(b, t, d), saved

    @staticmethod
    def backward(
        g: Any, saved: tuple[Any, ...], dims: tuple[int, int, int, int], causal: bool, rope: Any
    ) -> Any:
        """``d_qkv [B, T, 3·D]`` from the output's gradient ``g``."""
        b, t, h, d = dims
        hd = d // h
        g4 = g.reshape(b, t, h, hd).transpose(0, 2, 1, 3)
        dq, dk, dv = sdpa_backward(g4, *saved)
        if rope is not None:
            dq, dk = (rope_backward(x, *rope) for x in (dq, dk))
        dqkv = xp_of(g).empty((b, t, 3, h, hd), dtype=g.dtype)
        packed = dqkv.transpose(2, 0, 3, 1, 4)
        packed[0], packed[1], packed[2] = dq, dk, dv
        return dqkv.reshape(b, t, 3 * d)


def _rotate_packed_qk(heads: Any, rope: Any, rotate: Any) -> None:
    """Applies ``rotate`` (:func:`apply_rope` or :func:`rope_backward`) in place to the q and
    k parts of packed heads ``[B, T, 3, H, head_dim]``."""
    c, s_ = rope[0][:, None, :], rope[1][:, None, :]
    heads[:, :, 0] = rotate(heads[:, :, 0], c, s_)
    heads[:, :, 1] = rotate(heads[:, :, 1], c, s_)


class RustAttention:
    """The fused attention kernel of ``moecore._core`` (float32 numpy)."""

    @staticmethod
    def accepts(qkv: Any) -> bool:
        """Whether the Rust kernel takes ``qkv``: a numpy array."""
        return isinstance(qkv, np.ndarray)

    @staticmethod
    def forward(qkv: Any, n_heads: int, causal: bool, rope: Any) -> tuple[Any, tuple[Any, ...]]:
        """As :meth:`ArrayAttention.forward`."""
        b, t, three_d = qkv.shape
        hd = three_d // 3 // n_heads
        src = np.ascontiguousarray(qkv)
        if rope is not None:
            src = src.copy()
            _rotate_packed_qk(src.reshape(b, t, 3, n_heads, hd), rope, apply_rope)
        out, probs = _core.fused_attention_forward(src, n_heads, causal)
        return out, (src, probs)

    @staticmethod
    def backward(
        g: Any, saved: tuple[Any, ...], dims: tuple[int, int, int, int], causal: bool, rope: Any
    ) -> Any:
        """As :meth:`ArrayAttention.backward`."""
        b, t, h, d = dims
        hd = d // h
        src, probs = saved
        d_qkv = _core.fused_attention_backward(src, probs, np.ascontiguousarray(g), h, causal)
        if rope is not None:
            _rotate_packed_qk(d_qkv.reshape(b, t, 3, h, hd), rope, rope_backward)
        return d_qkv


def packed_kernels(qkv: Any, n_heads: int) -> Any:
    """The implementation of packed attention for ``qkv`` split into ``n_heads`` heads."""
    if qkv.shape[-1] // 3 // n_heads == 0:
        # head_dim 0 (an empty projection) is left to the array-module version
        return array_module_implementation("attention")
    return select_for("attention", qkv)
