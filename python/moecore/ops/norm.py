"""Fused normalisations over the last axis: LayerNorm and RMSNorm (one op each)."""

from __future__ import annotations

from typing import Any

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of


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
    return LayerNormFn.apply(x, weight, bias, eps=eps)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis with an optional ``weight``."""
    return RMSNormFn.apply(x, weight, eps=eps)
