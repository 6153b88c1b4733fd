"""Fused normalisations over the last axis: LayerNorm and RMSNorm (one op each)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import _core
from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of


def _fused(x: Any, *params: Any) -> bool:
    """Whether the Rust kernel takes these arrays: float32 numpy, contiguous, 1-D params."""
    return (
        type(x) is np.ndarray
        and x.dtype == np.float32
        and x.ndim >= 1
        and all(
            p is None or (type(p) is np.ndarray and p.dtype == np.float32 and p.ndim == 1)
            for p in params
        )
    )


def _rows(x: Any) -> Any:
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]))


class FusedNormFn(Function):
    """LayerNorm (``center``) or RMSNorm through one Rust pass each way (float32 CPU)."""

    @staticmethod
    def forward(
        ctx: Context, x: Any, weight: Any, bias: Any, eps: float = 1e-5, center: bool = True
    ) -> Any:
        x2 = _rows(x)
        w = None if weight is None else np.ascontiguousarray(weight)
        b = None if bias is None else np.ascontiguousarray(bias)
        out, mean, rstd = _core.fused_norm_forward(x2, w, b, float(eps), center)
        ctx.save_for_backward(x2, mean, rstd, w)
        ctx.opts = (x.shape, float(eps), center)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        x2, mean, rstd, w = ctx.saved_tensors
        shape, eps, center = ctx.opts
        _, need_w, need_b = ctx.needs_input_grad
        g2 = np.ascontiguousarray(g.reshape(x2.shape), dtype=np.float32)
        dx, dw, db = _core.fused_norm_backward(
            g2, x2, mean, rstd, w, eps, center, bool(need_w), bool(need_b)
        )
        return dx.reshape(shape), dw, db


class LayerNormFn(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, weight: Any, bias: Any, eps: float = 1e-5) -> Any:
        xp = xp_of(x)
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=-1, keepdims=True)
        rstd = (1.0 / xp.sqrt(var + eps)).astype(x.dtype, copy=False)
        xhat = centered * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        out = xhat * weight if weight is not None else xhat.copy()
        if bias is not None:
            out += bias
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        xhat, rstd, weight = ctx.saved_tensors
        _, nw, nb = ctx.needs_input_grad
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(axis=lead) if nw else None
        gb = g.sum(axis=lead) if nb else None
        gx = None
        if ctx.needs_input_grad[0]:
            gh = g * weight if weight is not None else g
            n = xhat.shape[-1]
            gx = (
                rstd
                / n
                * (
                    n * gh
                    - gh.sum(axis=-1, keepdims=True)
                    - xhat * (gh * xhat).sum(axis=-1, keepdims=True)
                )
            )
        return gx, gw, gb


class RMSNormFn(Function):
    @staticmethod
    def forward(ctx: Context, x: Any, weight: Any, eps: float = 1e-6) -> Any:
        xp = xp_of(x)
        rrms = (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)).astype(
            x.dtype, copy=False
        )
        xhat = x * rrms
        ctx.save_for_backward(xhat, rrms, weight)
        return xhat * weight if weight is not None else xhat

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        xhat, rrms, weight = ctx.saved_tensors
        nx, nw = ctx.needs_input_grad
        gw = (g * xhat).sum(axis=tuple(range(g.ndim - 1))) if nw else None
        gx = None
        if nx:
            gh = g * weight if weight is not None else g
            n = xhat.shape[-1]
            gx = rrms * (gh - xhat * (gh * xhat).sum(axis=-1, keepdims=True) / n)
        return gx, gw


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last axis with optional affine ``weight`` and ``bias``."""
    if _fused(x.data, *(None if p is None else p.data for p in (weight, bias))):
        return FusedNormFn.apply(x, weight, bias, eps=eps, center=True)
    return LayerNormFn.apply(x, weight, bias, eps=eps)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis with an optional ``weight``."""
    if _fused(x.data, None if weight is None else weight.data):
        return FusedNormFn.apply(x, weight, None, eps=eps, center=False)
    return RMSNormFn.apply(x, weight, eps=eps)
