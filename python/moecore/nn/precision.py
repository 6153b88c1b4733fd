"""Mixed precision for a model: where values are rounded to the compute format.

:func:`apply_precision` makes a model compute as a bf16, fp16 or fp8 run does, by rounding
values at the points where such a run stores them in the low format, while every op keeps
computing in float32 (the CPU kernels are float32; the bf16 numbers they read are exactly
representable in it):

- **weights**: the compute copies of :class:`moecore.optim.MasterWeights` — each float32
  master rounded to the format (fp8: GEMM weights block-quantized to e4m3, 128 × 128
  blocks); norm parameters and the MoE router stay float32;
- **activations**: the outputs of the embedding, every Linear (and its input), the norms,
  the MoE layer and each block (the residual stream), with their gradients rounded the same
  way in backward (:class:`RoundTo`) — fp16's overflow to inf and underflow to zero happen
  where they would, which is what the loss scaler is for;
- **kept in float32**, as the DeepSeek-V3 report keeps them: the norms' arithmetic, softmax,
  the router logits and probabilities, the output logits and the loss, and the optimizer step.

fp8 (DeepSeek-V3's recipe): activations and weights as bf16, and each Linear's GEMM operands
quantized to e4m3 with fine-grained scales — the input per 1 × 128 tile, the weight per
128 × 128 block, the output gradient (the Dgrad and Wgrad operand) per 1 × 128 tile — through
:mod:`moecore.kernels.fp8`; the MoE experts' weights block-quantized and their input
tile-quantized. The fp8 products are exact in float32 and summed in float32, which is what
the recipe's promotion every 128 products achieves (:func:`moecore.kernels.fp8.fp8_gemm`
does it chunk by chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.kernels.fp8 import fake_quantize_activation, fake_quantize_weight
from moecore.kernels.lowp import COMPUTE_DTYPES, is_low_precision, round_to
from moecore.nn.layers import Embedding, LayerNorm, Linear, RMSNorm
from moecore.nn.module import Module
from moecore.nn.moe import MoE

#: Parameter roles: kept float32; a GEMM weight; an MoE expert weight; any other (stored in
#: the compute format).
FP32, GEMM, EXPERT, STORED = "fp32", "gemm", "expert", "stored"


class RoundTo(Function):
    """``x`` rounded to ``dtype`` (values of the format, held in float32); the gradient is
    rounded the same way (a stored activation's gradient is stored in the format too)."""

    @staticmethod
    def forward(ctx: Context, x: Any, dtype: Any) -> Any:
        ctx.dtype = dtype
        return round_to(x, dtype)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return round_to(g, ctx.dtype), None


class Fp8Input(Function):
    """A GEMM's input through e4m3 with one scale per 1 × 128 tile; the gradient passes
    straight through (it is quantized where it is a GEMM operand: :class:`Fp8OutputGrad`)."""

    @staticmethod
    def forward(ctx: Context, x: Any) -> Any:
        return fake_quantize_activation(x)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g


class Fp8OutputGrad(Function):
    """Identity forward; in backward the GEMM's output gradient, the operand of its Dgrad
    and Wgrad GEMMs, goes through e4m3 with one scale per 1 × 128 tile."""

    @staticmethod
    def forward(ctx: Context, y: Any) -> Any:
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return fake_quantize_activation(g)


def round_tensor(x: Tensor, dtype: Any) -> Tensor:
    """``x`` rounded to ``dtype`` (:class:`RoundTo`), or ``x`` when ``dtype`` is float32."""
    return RoundTo.apply(x, dtype) if is_low_precision(dtype) else x


def parameter_roles(model: Module) -> dict[int, str]:
    """``id(parameter)`` → its role (:data:`FP32`, :data:`GEMM`, :data:`EXPERT`,
    :data:`STORED`) under mixed precision."""
    roles: dict[int, str] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None or (id(p) in roles and roles[id(p)] != STORED):
                continue
            if isinstance(module, LayerNorm | RMSNorm) or (
                isinstance(module, MoE) and name == "router"
            ):
                roles[id(p)] = FP32
            elif isinstance(module, Linear) and name == "weight":
                roles[id(p)] = GEMM
            elif isinstance(module, MoE) and name in ("w1", "w2"):
                roles[id(p)] = EXPERT
            else:
                roles.setdefault(id(p), STORED)
    return roles


def compute_copy_fn(
    model: Module, dtype_name: str, scheduled: dict[int, Any] | None = None
) -> Callable[[Tensor], np.ndarray | None]:
    """The function making a parameter's compute copy from its float32 master under
    ``dtype_name`` (None: the master itself, for float32 and the float32-kept roles).
    ``scheduled`` (``id(parameter)`` → a dtype, read at each call) overrides the format of
    the parameters it names (the HPTS scheduler's decisions)."""
    dtype = COMPUTE_DTYPES[dtype_name]
    roles = parameter_roles(model)
    fp8 = dtype_name == "fp8"

    def copy(p: Tensor) -> np.ndarray | None:
        if scheduled is not None and id(p) in scheduled:
            chosen = scheduled[id(p)]
            return round_to(p.data, chosen) if is_low_precision(chosen) else None
        role = roles.get(id(p), STORED)
        if role == FP32 or not is_low_precision(dtype):
            return None
        if fp8 and role in (GEMM, EXPERT):
            return fake_quantize_weight(p.data)
        return round_to(p.data, dtype)

    return copy


def _wrap(module: Module, around: Callable[[Callable[..., Tensor], Any], Tensor]) -> None:
    inner = module.forward

    def forward(x: Any, *args: Any, **kwargs: Any) -> Tensor:
        return around(lambda y: inner(y, *args, **kwargs), x)

    object.__setattr__(module, "forward", forward)


def apply_precision(
    model: Module, dtype_name: str, residual: tuple[type[Module], ...] = ()
) -> None:
    """Makes ``model``'s forward and backward round activations as a ``dtype_name`` run
    stores them (see the module docs); float32 changes nothing. Call once, after any
    sharding of the model; pair it with :class:`moecore.optim.MasterWeights` built with
    :func:`compute_copy_fn` for the weights.

    Args:
        model: the model (its modules' ``forward`` are wrapped in place).
        dtype_name: ``"float32"``, ``"bf16"``, ``"fp16"`` or ``"fp8"``.
        residual: module types whose output is the residual stream (a transformer's block),
            stored in the compute format too.

    Raises:
        ValueError: ``dtype_name`` is not one of ``float32``, ``bf16``, ``fp16``, ``fp8``.
    """
    if dtype_name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(COMPUTE_DTYPES)}, got {dtype_name!r}")
    dtype = COMPUTE_DTYPES[dtype_name]
    if not is_low_precision(dtype):
        return
    fp8 = dtype_name == "fp8"

    def rounded(fn: Callable[..., Tensor], x: Any) -> Tensor:
        return round_tensor(fn(x), dtype)

    def gemm(fn: Callable[..., Tensor], x: Any) -> Tensor:
        if fp8:
            return round_tensor(Fp8OutputGrad.apply(fn(Fp8Input.apply(x))), dtype)
        return round_tensor(fn(round_tensor(x, dtype)), dtype)

    def experts(fn: Callable[..., Tensor], x: Any) -> Tensor:
        x = round_tensor(x, dtype)
        return round_tensor(fn(Fp8Input.apply(x) if fp8 else x), dtype)

    for module in model.modules():
        if isinstance(module, Linear):
            _wrap(module, gemm)
        elif isinstance(module, MoE):
            _wrap(module, experts)
        elif isinstance(module, Embedding | LayerNorm | RMSNorm) or isinstance(module, residual):
            _wrap(module, rounded)
