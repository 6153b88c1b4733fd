"""moecore: Mixture-of-Experts training with a Rust core.

Tensors with autograd (:class:`Tensor`, :func:`tensor`, :func:`no_grad`), differentiable ops
(:mod:`moecore.ops`), layers (:mod:`moecore.nn`) and optimizers (:mod:`moecore.optim`), built
on runtime pieces that are usable alone on plain arrays: the memory pool, the top-k
compressor, the sparse kernels and the communication scheduler.

The names below, and submodules such as ``moecore.autograd``, load on first use (PEP 562), so
``import moecore.pool`` (or ``compress``, ``sparse``, ``moe_kernels``, ``comm``) embeds a
runtime piece without loading the autograd.
"""

from __future__ import annotations

# First, before anything imports numpy: how OpenBLAS's idle threads wait (see the module).
from moecore import _blas_env  # noqa: F401  # isort: skip
import importlib as _importlib
import importlib.util as _importlib_util
from typing import TYPE_CHECKING, Any

from moecore._core import build_info

if TYPE_CHECKING:
    from moecore import errors, ops
    from moecore.autograd import (
        Tensor,
        arange,
        enable_grad,
        from_dlpack,
        get_rng_state,
        is_grad_enabled,
        manual_seed,
        no_grad,
        ones,
        randn,
        set_grad_enabled,
        set_rng_state,
        tensor,
        zeros,
    )

__version__: str = build_info()["version"]

__all__ = [
    "Tensor",
    "__version__",
    "arange",
    "enable_grad",
    "errors",
    "from_dlpack",
    "get_rng_state",
    "is_grad_enabled",
    "manual_seed",
    "no_grad",
    "ones",
    "ops",
    "randn",
    "set_grad_enabled",
    "set_rng_state",
    "tensor",
    "zeros",
]


def __getattr__(name: str) -> Any:
    """Loads ``moecore.Tensor`` (and the rest of ``__all__``) or a submodule such as
    ``moecore.ops`` on first use, and keeps it."""
    if name in __all__ and name not in ("errors", "ops"):
        value = getattr(_importlib.import_module(f"{__name__}.autograd"), name)
    elif not name.startswith("_") and _importlib_util.find_spec(f"{__name__}.{name}"):
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
