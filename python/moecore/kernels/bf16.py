"""The bf16 kernels of ``moecore._core`` on numpy arrays of ``ml_dtypes.bfloat16``.

Each kernel reads and writes bf16 and accumulates in float32 (the GEMMs through the bf16
GEMM doorway, which widens the operands panel by panel while packing them; the norms and
attention widen a block of rows at a time): no float32 copy of a whole operand is made, and
the results are rounded to bf16 once. What the kernels keep in float32: norm statistics,
attention probabilities (softmax in float32) and parameter gradients (they feed the float32
master weights).

How the arrays cross into Rust: numpy has no bf16 of its own, so each bf16 array is passed
as a ``uint16`` view of the same memory (:func:`bits`, no copy) and the ``uint16`` results
are viewed back as bf16 (:func:`from_bits`).

The registry (:mod:`moecore.kernels.registry`) serves ``("norm" | "attention", "cpu",
"bfloat16")`` from :class:`BF16Norm` and :class:`BF16Attention`; the MoE family's bf16
implementation is :mod:`moecore.kernels.moe_bf16`. :func:`matmul` is the dense bf16 GEMM
(a ``Linear`` layer's product).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import _core
from moecore.kernels.lowp import BF16, widen_bf16
from moecore.kernels.norm import RustNorm


def bits(a: Any) -> np.ndarray:
    """``a`` (bf16) as a C-contiguous ``uint16`` view of the same memory; a non-contiguous
    ``a`` is copied first. Raises ``TypeError`` for another dtype."""
    if not isinstance(a, np.ndarray) or a.dtype != BF16:
        raise TypeError(
            f"expected a numpy array of bfloat16, got {getattr(a, 'dtype', type(a).__name__)}"
        )
    return np.ascontiguousarray(a).view(np.uint16)


def from_bits(u: np.ndarray) -> np.ndarray:
    """A ``uint16`` array returned by a bf16 kernel, viewed as bf16 (no copy)."""
    return u.view(BF16)


#: A bf16 array as float32, exactly (:func:`moecore.kernels.lowp.widen_bf16`).
widen = widen_bf16


def _f32(a: Any) -> Any:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


def matmul(a: np.ndarray, b: np.ndarray, transpose_b: bool = False) -> np.ndarray:
    """``a @ b`` (or ``a @ b.T`` with ``transpose_b``, ``b`` stored ``[n, k]``) for 2-D bf16
    arrays, accumulated in float32 and rounded once to bf16; on rayon's threads with the
    GIL released.

    Raises:
        ValueError: the inner dimensions do not match.
    """
    return from_bits(_core.bf16_matmul(bits(a), bits(b), transpose_b))


class BF16Linear:
    """``x @ w.T + bias`` (a ``Linear`` layer) for bf16 ``x`` and ``w``: the product through
    the bf16 GEMM doorway, bf16 out; in backward the input gradient bf16 and the weight and
    bias gradients float32 (they feed the float32 masters)."""

    @staticmethod
    def forward(x2: Any, w: Any, bias: Any) -> tuple[Any, tuple[Any, ...]]:
        """``(y, saved)`` for 2-D ``x2 [T, in]`` and ``w [out, in]``."""
        y = matmul(x2, w, transpose_b=True)
        if bias is not None:
            # Added in float32 and rounded again: bf16 has no fused bias epilogue here.
            y = (widen(y) + np.asarray(bias, dtype=np.float32)).astype(BF16)
        return y, (x2, w)

    @staticmethod
    def backward(
        g2: Any, saved: tuple[Any, ...], need_x: bool, need_w: bool, need_b: bool
    ) -> tuple[Any, Any, Any]:
        """``(gx [T, in] bf16, gw [out, in] float32, gb [out] float32)``."""
        x2, w = saved
        g2 = np.asarray(g2).astype(BF16, copy=False)
        gx = matmul(g2, w) if need_x else None
        gw = None
        if need_w:
            # gwᵀ = x2ᵀ·g2 is the grouped kernel's weight gradient for one group of all rows:
            # bf16 operands, float32 accumulation and result.
            counts = np.array([x2.shape[0]], dtype=np.int32)
            gw_t = _core.moe_grouped_matmul_dw_bf16(bits(x2), bits(g2), counts)[0]
            gw = np.ascontiguousarray(gw_t.T)
        gb = widen(g2).sum(axis=0) if need_b else None
        return gx, gw, gb


class BF16Activation:
    """GELU of bf16 arrays: widened to float32 (exactly, by a shift of the bits), the
    float32 kernel run (the fused Rust tanh-GELU, or the erf form), the result rounded once
    to bf16."""

    @staticmethod
    def accepts(x: Any, *_: Any) -> bool:
        """Whether it takes ``x``: a numpy array."""
        return isinstance(x, np.ndarray)

    @staticmethod
    def gelu_forward(x: Any, approximate: str) -> tuple[Any, Any]:
        """GELU of ``x`` in bf16 and what :meth:`gelu_backward` needs (float32, if any)."""
        from moecore.kernels.activation import RustActivation

        out, saved = RustActivation.gelu_forward(widen(x), approximate)
        return out.astype(BF16), saved

    @staticmethod
    def gelu_backward(g: Any, x: Any, saved: Any, approximate: str) -> Any:
        """Gradient of GELU at bf16 ``x``, in bf16 (computed in float32)."""
        from moecore.kernels.activation import RustActivation

        g32 = widen(g) if g.dtype == BF16 else np.ascontiguousarray(g, dtype=np.float32)
        return RustActivation.gelu_backward(g32, widen(x), saved, approximate).astype(BF16)


class BF16Norm:
    """LayerNorm or RMSNorm of bf16 rows through one Rust pass each way: statistics in
    float32, ``x`` and the output bf16, the parameters float32."""

    #: The arrays it takes are the float32 Rust kernel's: numpy, ``x`` at least 1-D, 1-D
    #: parameters.
    accepts = staticmethod(RustNorm.accepts)

    @staticmethod
    def forward(
        x: Any, weight: Any, bias: Any, eps: float, center: bool
    ) -> tuple[Any, tuple[Any, ...]]:
        """The normalised ``x`` (bf16) and what :meth:`backward` needs."""
        x2 = bits(x.reshape(-1, x.shape[-1]))
        w, b = _f32(weight), _f32(bias)
        out, mean, rstd = _core.fused_norm_forward_bf16(x2, w, b, float(eps), center)
        saved = (from_bits(x2), mean, rstd, w, x.shape, float(eps), center)
        return from_bits(out).reshape(x.shape), saved

    @staticmethod
    def backward(
        g: Any, saved: tuple[Any, ...], need_x: bool, need_w: bool, need_b: bool
    ) -> tuple[Any, Any, Any]:
        """``(dx, dw, db)``: ``dx`` in bf16, ``dw``, ``db`` float32."""
        x2, mean, rstd, w, shape, eps, center = saved
        g2 = bits(np.asarray(g).astype(BF16, copy=False).reshape(x2.shape))
        dx, dw, db = _core.fused_norm_backward_bf16(
            g2, bits(x2), mean, rstd, w, eps, center, bool(need_w), bool(need_b)
        )
        return from_bits(dx).reshape(shape), dw, db


class BF16Attention:
    """Attention from a packed bf16 projection: ``qkv`` and the output bf16, the
    probabilities float32 (rotary embeddings are applied in float32 and rounded to bf16)."""

    @staticmethod
    def accepts(qkv: Any) -> bool:
        """Whether the kernel takes ``qkv``: a numpy array."""
        return isinstance(qkv, np.ndarray)

    @staticmethod
    def forward(qkv: Any, n_heads: int, causal: bool, rope: Any) -> tuple[Any, tuple[Any, ...]]:
        """As :meth:`moecore.kernels.attention.ArrayAttention.forward`, in bf16."""
        from moecore.kernels.attention import _rotate_packed_qk, apply_rope

        b, t, three_d = qkv.shape
        hd = three_d // 3 // n_heads
        src = qkv
        if rope is not None:
            wide = widen(qkv)
            _rotate_packed_qk(wide.reshape(b, t, 3, n_heads, hd), rope, apply_rope)
            src = wide.astype(BF16)
        src = np.ascontiguousarray(src)
        out, probs = _core.fused_attention_forward_bf16(bits(src), n_heads, causal)
        return from_bits(out), (src, probs)

    @staticmethod
    def backward(
        g: Any, saved: tuple[Any, ...], dims: tuple[int, int, int, int], causal: bool, rope: Any
    ) -> Any:
        """As :meth:`moecore.kernels.attention.ArrayAttention.backward`: ``d_qkv`` in bf16."""
        from moecore.kernels.attention import _rotate_packed_qk, rope_backward

        b, t, h, d = dims
        src, probs = saved
        g16 = bits(np.asarray(g).astype(BF16, copy=False))
        d_qkv = from_bits(_core.fused_attention_backward_bf16(bits(src), probs, g16, h, causal))
        if rope is not None:
            wide = widen(d_qkv)
            _rotate_packed_qk(wide.reshape(b, t, 3, h, d // h), rope, rope_backward)
            d_qkv = wide.astype(BF16)
        return d_qkv
