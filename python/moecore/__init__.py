"""moecore: Mixture-of-Experts training with a Rust core.

Tensors with autograd (:class:`Tensor`, :func:`tensor`, :func:`no_grad`), differentiable ops
(:mod:`moecore.ops`), layers (:mod:`moecore.nn`) and optimizers (:mod:`moecore.optim`), built
on runtime pieces that are usable alone on plain arrays: the memory pool, the top-k
compressor, the sparse kernels and the communication scheduler.
"""

from __future__ import annotations

# First, before anything imports numpy: how OpenBLAS's idle threads wait (see the module).
from moecore import _blas_env  # noqa: F401  # isort: skip
from moecore import (
    errors,
    ops,
)
from moecore._core import build_info
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
