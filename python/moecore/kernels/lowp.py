"""Low-precision number formats on arrays: the run's ``dtype`` names, rounding to a format,
and the float32 doorway through which a kernel family serves bf16/fp16 arrays.

Training in a low precision keeps float32 *master* weights and computes from copies rounded
to the low format (:mod:`moecore.optim.master_weights`); activations and their gradients are
rounded where a low-precision run would store them (:mod:`moecore.nn.precision`). This module
holds the array-level pieces, usable without autograd:

- :data:`COMPUTE_DTYPES` — the run config's names → numpy dtypes (``ml_dtypes`` for bf16 and
  the fp8 formats);
- :func:`round_to` — a float32 array whose values are those of the low format, as a store
  into that format and a load back would give (round to nearest even, overflow to ±inf for
  fp16/bf16; fp8 e4m3 has no infinity and saturates here, as the fp8 recipes do);
- :func:`float32_doorway` — a kernel family's bf16/fp16 implementation made from its float32
  one: inputs converted to float32 at the doorway, the float32 kernel run, the activation
  it returns stored back in the input's format (its saved state stays float32, so a norm's
  statistics and attention's probabilities keep float32).
"""

from __future__ import annotations

import functools
from typing import Any

import ml_dtypes
import numpy as np

from moecore.backend import widen_bf16

__all__ = [
    "BF16",
    "COMPUTE_DTYPES",
    "float32_doorway",
    "is_low_precision",
    "round_to",
    "unit_roundoff",
    "widen_bf16",
]

#: The run config's ``dtype`` values → the format weights and activations are stored in.
#: ``fp8`` stores them in bf16 and runs the GEMMs' operands in e4m3 (:mod:`moecore.kernels.fp8`).
COMPUTE_DTYPES: dict[str, Any] = {
    "float32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "fp16": np.dtype(np.float16),
    "fp8": np.dtype(ml_dtypes.bfloat16),
}

#: numpy dtype names of the formats narrower than float32 that the doorway serves.
LOW_PRECISION_NAMES = ("bfloat16", "float16")


def is_low_precision(dtype: Any) -> bool:
    """Whether ``dtype`` is a float format narrower than float32 (bf16, fp16, fp8)."""
    dt = np.dtype(dtype)
    return dt.itemsize < 4 and (
        dt.kind == "f" or dt.name in LOW_PRECISION_NAMES or "float8" in dt.name
    )


def round_to(x: Any, dtype: Any) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back, as a new float32 array (``x`` itself, converted to
    float32, when ``dtype`` is float32 or wider). fp16 and bf16 overflow to ±inf (that is what
    a loss scaler detects); a float8 ``e4m3fn`` format, which has no infinity, saturates to
    ±448 instead of NaN."""
    dt = np.dtype(dtype)
    x = np.asarray(x)
    if not is_low_precision(dt):
        return x.astype(np.float32, copy=True)
    if "float8" in dt.name:
        top = float(ml_dtypes.finfo(dt).max)
        x = np.clip(x, -top, top)
    with np.errstate(over="ignore"):
        return x.astype(dt).astype(np.float32)


def unit_roundoff(dtype: Any) -> float:
    """Half the distance from 1 to the next value of ``dtype``: the largest relative error
    of one rounding to nearest of a normal number (2⁻⁸ for bf16, 2⁻¹¹ for fp16, 2⁻⁴ for
    e4m3)."""
    dt = np.dtype(dtype)
    eps = (
        float(ml_dtypes.finfo(dt).eps)
        if dt.kind == "V" or "float8" in dt.name
        else float(np.finfo(dt).eps)
    )
    return eps / 2


#: numpy's dtype for bf16 (``ml_dtypes.bfloat16``; numpy has none of its own).
BF16 = np.dtype(ml_dtypes.bfloat16)


def _to_f32(a: Any) -> Any:
    if isinstance(a, np.ndarray) and a.dtype.name in LOW_PRECISION_NAMES:
        return a.astype(np.float32)
    return a


def _first_low(args: tuple[Any, ...]) -> Any:
    for a in args:
        if isinstance(a, np.ndarray) and a.dtype.name in LOW_PRECISION_NAMES:
            return a.dtype
    return None


def _store(out: Any, dtype: Any) -> Any:
    """The first element of a kernel's result (its activation, or its input gradient) in
    ``dtype``; the rest (saved state, parameter gradients) as float32 returned it."""
    if dtype is None:
        return out
    if isinstance(out, tuple):
        head = out[0]
        return (head.astype(dtype) if head is not None else None, *out[1:])
    return out.astype(dtype)


def _through(method: Any) -> Any:
    @functools.wraps(method)
    def through_doorway(*args: Any, **kwargs: Any) -> Any:
        dtype = _first_low(args)
        return _store(method(*(_to_f32(a) for a in args), **kwargs), dtype)

    return through_doorway


def float32_doorway(fp32: type, name: str) -> type:
    """A family's implementation for bf16/fp16 numpy arrays made from its float32 one
    ``fp32`` (a class of static methods): each method converts its low-precision array
    arguments to float32, runs ``fp32``'s, and stores the first result (the activation in
    forward, the input's gradient in backward) in the low format of the first such
    argument. What the kernel saves for backward and the parameters' gradients stay float32
    (they feed the float32 master weights). ``accepts`` is ``fp32``'s."""
    methods: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"{fp32.__name__} behind the float32 doorway (bf16/fp16 numpy arrays).",
    }
    for attr in dir(fp32):
        if attr.startswith("_"):
            continue
        method = getattr(fp32, attr)
        methods[attr] = staticmethod(method if attr == "accepts" else _through(method))
    cls = type(name, (), methods)
    cls.__qualname__ = name
    return cls


def _norm() -> type:
    from moecore.kernels.norm import RustNorm

    return float32_doorway(RustNorm, "DoorwayNorm")


def _attention() -> type:
    from moecore.kernels.attention import RustAttention

    return float32_doorway(RustAttention, "DoorwayAttention")


#: The doorway implementations the registry names (``moecore.kernels.lowp:DoorwayNorm`` …),
#: built on first access so importing this module loads no other kernel module.
def __getattr__(name: str) -> Any:
    makers = {"DoorwayNorm": _norm, "DoorwayAttention": _attention}
    if name in makers:
        value = makers[name]()
        globals()[name] = value
        return value
    raise AttributeError(name)
