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
