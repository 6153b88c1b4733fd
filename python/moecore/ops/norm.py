"""Normalisations over the last axis: LayerNorm and RMSNorm (one op each way)."""

from __future__ import annotations

from typing import Any

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.kernels.norm import norm_kernels


class NormFn(Function):
    """LayerNorm (``center``) or RMSNorm (no ``bias``) by the kernel chosen for the arrays
    (one Rust pass each way for float32 CPU, array-module operations otherwise)."""

    @staticmethod
    def forward(
        ctx: Context, x: Any, weight: Any, bias: Any, eps: float = 1e-5, center: bool = True
    ) -> Any:
        ctx.kernels = norm_kernels(x, weight, bias)
        out, saved = ctx.kernels.forward(x, weight, bias, eps, center)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        need_x, need_w, need_b = ctx.needs_input_grad
        return ctx.kernels.backward(g, ctx.saved_tensors, need_x, need_w, need_b)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last axis with optional affine ``weight`` and ``bias``."""
    return NormFn.apply(x, weight, bias, eps=eps, center=True)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last axis with an optional ``weight``."""
    return NormFn.apply(x, weight, None, eps=eps, center=False)
