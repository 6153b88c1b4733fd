"""The one place that chooses which implementation runs a kernel family.

:data:`IMPLEMENTATIONS` maps ``(family, device, dtype)`` to the implementation that serves
it, written as ``"module"`` or ``"module:attribute"`` and imported on first use (so a CPU
run never imports the CUDA host code, nor CuPy). Adding a dtype or a device to a family is
one line of that table. :func:`select` looks a key up; :func:`select_for` derives the key
from the arrays an op was given. An implementation may refuse particular arrays of its
(device, dtype) — a layout its kernel does not take, such as a non-contiguous array — by an
``accepts(*arrays)`` method; those, and arrays that do not share one device and dtype, go
to the family's array-module implementation (:data:`ARRAY_MODULE`), the same math written
with numpy/CuPy operations.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

import numpy as np

from moecore.backend import is_cupy_array

#: (family, device, dtype name) → the implementation, imported lazily. ``moe`` names whole
#: modules (they implement :class:`moecore.kernels.moe.MoEKernels`); the other families name
#: a class in their module of :mod:`moecore.kernels` whose static methods are the kernels.
IMPLEMENTATIONS: dict[tuple[str, str, str], str] = {
    ("moe", "cpu", "float32"): "moecore.moe_kernels",
    ("moe", "cpu", "float64"): "moecore.kernels.generic",
    ("moe", "cuda", "float32"): "moecore.kernels.cuda.moe_kernels",
    ("moe", "cuda", "float64"): "moecore.kernels.generic",
    ("bsr", "cpu", "float32"): "moecore.kernels.bsr:RustBsr",
    ("bsr", "cpu", "float64"): "moecore.kernels.bsr:DenseBsr",
    ("bsr", "cuda", "float32"): "moecore.kernels.bsr:CudaBsr",
    ("bsr", "cuda", "float64"): "moecore.kernels.bsr:DenseBsr",
    ("topk", "cpu", "float32"): "moecore.kernels.topk:RustTopK",
    ("topk", "cuda", "float32"): "moecore.kernels.topk:CudaTopK",
    ("adamw", "cpu", "float32"): "moecore.kernels.adamw:RustAdamW",
    ("adamw", "cpu", "float64"): "moecore.kernels.adamw:ArrayAdamW",
    ("adamw", "cuda", "float32"): "moecore.kernels.adamw:CudaAdamW",
    ("adamw", "cuda", "float64"): "moecore.kernels.adamw:ArrayAdamW",
    ("attention", "cpu", "float32"): "moecore.kernels.attention:RustAttention",
    ("attention", "cpu", "float64"): "moecore.kernels.attention:ArrayAttention",
    ("attention", "cuda", "float32"): "moecore.kernels.attention:ArrayAttention",
    ("attention", "cuda", "float64"): "moecore.kernels.attention:ArrayAttention",
    ("norm", "cpu", "float32"): "moecore.kernels.norm:RustNorm",
    ("norm", "cpu", "float64"): "moecore.kernels.norm:ArrayNorm",
    ("norm", "cuda", "float32"): "moecore.kernels.norm:ArrayNorm",
    ("norm", "cuda", "float64"): "moecore.kernels.norm:ArrayNorm",
    ("activation", "cpu", "float32"): "moecore.kernels.activation:RustActivation",
    ("activation", "cpu", "float64"): "moecore.kernels.activation:ArrayActivation",
    ("activation", "cuda", "float32"): "moecore.kernels.activation:ArrayActivation",
    ("activation", "cuda", "float64"): "moecore.kernels.activation:ArrayActivation",
    ("linear", "cpu", "float32"): "moecore.kernels.linear:ArrayLinear",
    ("linear", "cpu", "float64"): "moecore.kernels.linear:ArrayLinear",
    ("linear", "cpu", "float16"): "moecore.kernels.linear:ArrayLinear",
    ("linear", "cuda", "float32"): "moecore.kernels.linear:ArrayLinear",
    ("linear", "cuda", "float64"): "moecore.kernels.linear:ArrayLinear",
    ("linear", "cuda", "float16"): "moecore.kernels.linear:ArrayLinear",
    # bf16: Rust kernels that read and write bf16 and accumulate in float32 (kernels/bf16.py)
    ("moe", "cpu", "bfloat16"): "moecore.kernels.moe_bf16",
    ("linear", "cpu", "bfloat16"): "moecore.kernels.bf16:BF16Linear",
    ("activation", "cpu", "bfloat16"): "moecore.kernels.bf16:BF16Activation",
    ("attention", "cpu", "bfloat16"): "moecore.kernels.bf16:BF16Attention",
    ("norm", "cpu", "bfloat16"): "moecore.kernels.bf16:BF16Norm",
    # fp16: the float32 kernel behind a converting doorway (kernels/lowp.py)
    ("attention", "cpu", "float16"): "moecore.kernels.lowp:DoorwayAttention",
    ("norm", "cpu", "float16"): "moecore.kernels.lowp:DoorwayNorm",
}

#: family → its array-module implementation (any device, any float dtype), for arrays an
#: entry of :data:`IMPLEMENTATIONS` refuses or that mix devices or dtypes. ``topk`` has none.
ARRAY_MODULE: dict[str, str] = {
    "moe": "moecore.kernels.generic",
    "bsr": "moecore.kernels.bsr:DenseBsr",
    "adamw": "moecore.kernels.adamw:ArrayAdamW",
    "attention": "moecore.kernels.attention:ArrayAttention",
    "norm": "moecore.kernels.norm:ArrayNorm",
    "activation": "moecore.kernels.activation:ArrayActivation",
    "linear": "moecore.kernels.linear:ArrayLinear",
}

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(f for f, _, _ in IMPLEMENTATIONS))

_loaded: dict[str, Any] = {}
#: (family, device, dtype as given) → (implementation, its ``accepts`` or None): the lookups
#: of every op call, so a hit is one dict access.
_selected: dict[tuple[str, str, Any], tuple[Any, Any]] = {}


def _load(target: str) -> Any:
    impl = _loaded.get(target)
    if impl is None:
        module, _, attribute = target.partition(":")
        impl = import_module(module)
        if attribute:
            impl = getattr(impl, attribute)
        _loaded[target] = impl
    return impl


def implemented(family: str) -> list[tuple[str, str]]:
    """The ``(device, dtype)`` pairs ``family`` has an implementation for."""
    return [(d, t) for f, d, t in IMPLEMENTATIONS if f == family]


def _entry(family: str, device: str, dtype: Any) -> tuple[Any, Any]:
    key = (family, device, dtype)
    entry = _selected.get(key)
    if entry is None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
        target = IMPLEMENTATIONS.get((family, device, name))
        if target is None:
            have = ", ".join(f"{d}/{t}" for d, t in implemented(family)) or "nothing"
            raise NotImplementedError(
                f"no {family!r} kernel for device {device!r}, dtype {name}; implemented: {have}"
            )
        impl = _load(target)
        entry = _selected[key] = (impl, getattr(impl, "accepts", None))
    return entry


def select(family: str, device: str, dtype: Any) -> Any:
    """The implementation of ``family`` for arrays of ``dtype`` on ``device``.

    Raises:
        NotImplementedError: no implementation is registered for (family, device, dtype);
            the message names all three and what is implemented.
    """
    return _entry(family, device, dtype)[0]


def array_module_implementation(family: str) -> Any:
    """``family``'s array-module implementation (numpy or CuPy, any float dtype)."""
    target = ARRAY_MODULE.get(family)
    if target is None:
        raise NotImplementedError(f"no array-module {family!r} kernel (only device kernels)")
    return _load(target)


def _device(a: Any) -> str:
    return "cpu" if type(a) is np.ndarray or not is_cupy_array(a) else "cuda"


def select_for(family: str, *arrays: Any) -> Any:
    """The implementation of ``family`` for these arrays (``None`` entries are skipped): the
    one registered for their common device and dtype, unless it refuses them (``accepts``) or
    they do not share one device and dtype — then the array-module one.

    Raises:
        NotImplementedError: as :func:`select`, for a device and dtype with no kernel.
    """
    first = arrays[0]
    device, dtype = _device(first), first.dtype
    for a in arrays[1:]:
        if a is not None and ((a.dtype is not dtype and a.dtype != dtype) or _device(a) != device):
            return array_module_implementation(family)
    impl, accepts = _entry(family, device, dtype)
    if accepts is not None and not accepts(*arrays):
        return array_module_implementation(family)
    return impl
