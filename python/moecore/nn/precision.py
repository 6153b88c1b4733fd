"""Mixed precision for a model: where values are stored in, or rounded to, a low format.

bf16 with ``storage=True`` (what a plain bf16 training run uses): :func:`apply_precision`
stores the activations as real ``ml_dtypes.bfloat16`` arrays (:class:`StoreAs`) while
:func:`bf16_storage` is active, the weights' compute copies are bf16 arrays
(:func:`compute_copy_fn`), and every op runs its bf16 kernel; the final norm's output is
widened to float32 (:class:`Widen`) so the logits and the loss stay float32.

Otherwise (fp16, fp8, bf16 under HPTS) :func:`apply_precision` makes a model compute as
such a run does, by rounding values at the points where it stores them in the low format,
while every op keeps computing in float32 (the values of the format are exactly
representable in float32):

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

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.kernels.fp8 import fake_quantize_activation, fake_quantize_weight
from moecore.kernels.lowp import COMPUTE_DTYPES, is_low_precision, round_to, widen_bf16
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


_BF16 = np.dtype(ml_dtypes.bfloat16)


class StoreAs(Function):
    """``x`` stored in ``dtype`` — a real ``ml_dtypes.bfloat16`` array, a copy only when
    ``x`` is in another format; the gradient goes back in ``x``'s format."""

    @staticmethod
    def forward(ctx: Context, x: Any, dtype: Any) -> Any:
        ctx.dtype = x.dtype
        return x if x.dtype == dtype else x.astype(dtype)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return (g if g.dtype == ctx.dtype else g.astype(ctx.dtype)), None


class Widen(Function):
    """``x`` as float32 (exact from bf16): the input of a float32 island (the output
    layer, whose logits and loss stay float32); the gradient stored back in ``x``'s format."""

    @staticmethod
    def forward(ctx: Context, x: Any) -> Any:
        ctx.dtype = x.dtype
        if x.dtype == _BF16:
            return widen_bf16(x)
        return x.astype(np.float32, copy=False)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        return g if g.dtype == ctx.dtype else g.astype(ctx.dtype)


#: Whether the modules :func:`apply_precision` wrapped with real storage store their
#: activations in bf16 now: only inside :func:`bf16_storage` (a training step's forward and
#: backward, where the weights are bf16 compute copies); outside it they compute as float32.
_storing = [False]


@contextlib.contextmanager
def bf16_storage() -> Iterator[None]:
    """Within the block, modules wrapped by ``apply_precision(..., storage=True)`` store
    their activations as real bf16 arrays (pair it with bf16 compute copies of the weights:
    :class:`moecore.optim.MasterWeights`)."""
    before = _storing[0]
    _storing[0] = True
    try:
        yield
    finally:
        _storing[0] = before


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
    model: Module,
    dtype_name: str,
    scheduled: dict[int, Any] | None = None,
    storage: bool = False,
) -> Callable[[Tensor], np.ndarray | None]:
    """The function making a parameter's compute copy from its float32 master under
    ``dtype_name`` (None: the master itself, for float32 and the float32-kept roles).
    ``scheduled`` (``id(parameter)`` → a dtype, read at each call) overrides the format of
    the parameters it names (the HPTS scheduler's decisions). ``storage`` (bf16 only): the
    copies are real ``ml_dtypes.bfloat16`` arrays rather than float32 ones holding bf16
    values."""
    dtype = COMPUTE_DTYPES[dtype_name]
    roles = parameter_roles(model)
    fp8 = dtype_name == "fp8"
    if storage and dtype_name != "bf16":
        raise ValueError(f"real low-precision storage is bf16 only, got dtype {dtype_name!r}")

    def copy(p: Tensor) -> np.ndarray | None:
        if scheduled is not None and id(p) in scheduled:
            chosen = scheduled[id(p)]
            return round_to(p.data, chosen) if is_low_precision(chosen) else None
        role = roles.get(id(p), STORED)
        if role == FP32 or not is_low_precision(dtype):
            return None
        if fp8 and role in (GEMM, EXPERT):
            return fake_quantize_weight(p.data)
        if storage:
            return p.data.astype(dtype)
        return round_to(p.data, dtype)

    return copy


def _wrap(module: Module, around: Callable[[Callable[..., Tensor], Any], Tensor]) -> None:
    inner = module.forward

    def forward(x: Any, *args: Any, **kwargs: Any) -> Tensor:
        return around(lambda y: inner(y, *args, **kwargs), x)

    object.__setattr__(module, "forward", forward)


def apply_precision(
    model: Module,
    dtype_name: str,
    residual: tuple[type[Module], ...] = (),
    storage: bool = False,
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
        storage: bf16 only — store the activations as real ``ml_dtypes.bfloat16`` arrays
            (inside :func:`bf16_storage`; the ops run their bf16 kernels) rather than round
            float32 ones; the output of a norm outside the ``residual`` modules (the final
            norm, read by the output layer) is widened to float32 there, so the logits and
            the loss stay float32.

    Raises:
        ValueError: ``dtype_name`` is not one of ``float32``, ``bf16``, ``fp16``, ``fp8``,
            or ``storage`` is asked of another format than bf16.
    """
    if dtype_name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(COMPUTE_DTYPES)}, got {dtype_name!r}")
    dtype = COMPUTE_DTYPES[dtype_name]
    if not is_low_precision(dtype):
        return
    if storage:
        if dtype_name != "bf16":
            raise ValueError(f"real low-precision storage is bf16 only, got {dtype_name!r}")
        _store_bf16(model, residual)
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


def _store(x: Any) -> Any:
    return StoreAs.apply(x, _BF16) if _storing[0] and isinstance(x, Tensor) else x


def _store_bf16(model: Module, residual: tuple[type[Module], ...]) -> None:
    """:func:`apply_precision` with real bf16 storage."""
    inside = {id(m) for r in model.modules() if isinstance(r, residual) for m in r.modules()}

    def stored(fn: Callable[..., Tensor], x: Any) -> Tensor:
        return _store(fn(x))

    def stored_input(fn: Callable[..., Tensor], x: Any) -> Tensor:
        return _store(fn(_store(x)))

    def widened(fn: Callable[..., Tensor], x: Any) -> Tensor:
        y = _store(fn(x))
        return Widen.apply(y) if _storing[0] else y

    for module in model.modules():
        if isinstance(module, Linear | MoE):
            _wrap(module, stored_input)
        elif isinstance(module, LayerNorm | RMSNorm) and id(module) not in inside:
            _wrap(module, widened)
        elif isinstance(module, Embedding | LayerNorm | RMSNorm) or isinstance(module, residual):
            _wrap(module, stored)
