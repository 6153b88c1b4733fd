"""Array backends: numpy on device ``"cpu"``, CuPy on ``"cuda"``.

CuPy is imported lazily, only when a CUDA array or device is actually asked for, so a CPU run
never pays for it (nor needs it installed).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

DEVICES = ("cpu", "cuda")


def _cupy() -> ModuleType:
    try:
        import cupy  # lazy: only CUDA paths need it
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "device 'cuda' needs CuPy: pip install moecore[gpu] (and a CUDA GPU)"
        ) from exc
    return cupy


def is_cupy_array(a: object) -> bool:
    """True for a ``cupy.ndarray`` (or another ``cupy``/``cupyx`` object), checked by its
    type's module, so CuPy is never imported for the check. moecore's one such check."""
    return (type(a).__module__ or "").split(".")[0] in ("cupy", "cupyx")


def xp_of(a: Any) -> ModuleType:
    """The array module (numpy or cupy) that owns ``a``: the ``cupy.get_array_module`` idiom."""
    return _cupy() if is_cupy_array(a) else np


def device_of(a: Any) -> str:
    """``"cuda"`` for a CuPy array, ``"cpu"`` otherwise."""
    return "cuda" if is_cupy_array(a) else "cpu"


def xp_for(device: str) -> ModuleType:
    """The array module of ``device`` (``"cpu"`` or ``"cuda"``)."""
    check_device(device)
    return np if device == "cpu" else _cupy()


def check_device(device: str) -> str:
    """Returns ``device`` if it names a known device, else raises ``ValueError``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return device


def to_device(a: Any, device: str) -> Any:
    """Moves array ``a`` to ``device`` (a no-op when it is already there)."""
    check_device(device)
    if device_of(a) == device:
        return a
    if device == "cpu":
        return a.get()
    return _cupy().asarray(a)


# DLPack device types (dlpack.h's DLDeviceType) the doorway tells apart.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def _dlpack_device_type(obj: Any) -> int:
    """The DLPack device type ``obj`` reports (CPU when it reports none)."""
    device = getattr(obj, "__dlpack_device__", None)
    return int(device()[0]) if device is not None else _DL_CPU


def as_array(obj: Any, what: str, *, gpu: bool = False) -> Any:
    """The runtime faces' one doorway for array arguments: ``obj`` as a numpy array (or, on
    a GPU path, a CuPy array) sharing its memory, never a copy.

    - numpy arrays come back as they are, CuPy arrays too when ``gpu`` (else
      ``NotImplementedError``: the operation has no GPU path);
    - any other DLPack exporter on the CPU (a PyTorch or JAX CPU tensor, a numpy array behind
      another type) is viewed through ``numpy.from_dlpack``; a CUDA exporter (a torch CUDA
      tensor) through ``cupy.from_dlpack`` when ``gpu``, else ``NotImplementedError``;
    - an exporter that cannot be viewed (a torch tensor that requires grad, a dtype numpy
      lacks such as bfloat16) is a ``TypeError`` naming ``what``;
    - anything else comes back unchanged, for the caller's own check to name.

    Dtype, layout and shape are not converted here: the caller checks them and refuses, naming
    ``what``, what it cannot use in place (a non-contiguous view stays non-contiguous).
    """
    if isinstance(obj, np.ndarray):
        return obj
    if is_cupy_array(obj):
        if gpu:
            return obj
        raise NotImplementedError(
            f"{what} is a CuPy array: this operation has no GPU path; pass a numpy array "
            "(cupy.asnumpy)"
        )
    if not hasattr(obj, "__dlpack__"):
        return obj
    kind = type(obj).__name__
    try:
        device = _dlpack_device_type(obj)
    except Exception as exc:  # an exporter's own failure, reported with the argument's name
        raise TypeError(f"{what}: {kind}.__dlpack_device__() failed: {exc}") from exc
    if device in (_DL_CUDA, _DL_CUDA_MANAGED):
        if not gpu:
            raise NotImplementedError(
                f"{what} is a CUDA {kind} (DLPack device {device}): this operation has no GPU "
                "path; pass a CPU tensor or array"
            )
        xp, where = _cupy(), "the GPU (CuPy)"
    elif device in (_DL_CPU, _DL_CUDA_HOST):
        xp, where = np, "the CPU"
    else:
        raise TypeError(f"{what}: {kind} lives on DLPack device {device}, neither CPU nor CUDA")
    try:
        return xp.from_dlpack(obj)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(
            f"{what}: could not view {kind} through DLPack on {where} without a copy "
            f"(a tensor that requires grad needs .detach()): {exc}"
        ) from exc


def is_bf16(dtype: Any) -> bool:
    """Whether ``dtype`` is bf16 (``ml_dtypes.bfloat16``; numpy has none of its own, and
    this check does not import ``ml_dtypes``)."""
    return bool(getattr(dtype, "kind", None) == "V" and getattr(dtype, "name", "") == "bfloat16")


def widen_bf16(a: Any) -> Any:
    """A bf16 numpy array as a new float32 one, exactly: each value's 16 bits shifted into
    the upper half of a 32-bit word (several times faster than ``ml_dtypes``' cast).

    Raises:
        TypeError: ``a`` is not a bf16 numpy array.
    """
    if not isinstance(a, np.ndarray) or not is_bf16(a.dtype):
        raise TypeError(f"expected a numpy array of bfloat16, got {getattr(a, 'dtype', a)!r}")
    u = np.ascontiguousarray(a).view(np.uint16).astype(np.uint32)
    u <<= 16
    return u.view(np.float32).reshape(a.shape)
