"""Tensors with reverse-mode automatic differentiation over numpy or CuPy arrays.

``Tensor`` records the :class:`Function` calls applied to it on a tape; ``backward`` walks
that tape in reverse topological order. Ops are coarse (a whole attention, a whole MoE
layer), so the tape stays short and the heavy work happens in kernels.
"""

from __future__ import annotations

# function.py first: its last line loads tensor.py, whose operators need its classes.
from moecore.autograd.function import Context, Function
from moecore.autograd.grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from moecore.autograd.gradcheck import GradcheckError, gradcheck
from moecore.autograd.random import get_rng_state, manual_seed, set_rng_state
from moecore.autograd.tensor import (
    Tensor,
    arange,
    from_dlpack,
    ones,
    randn,
    tensor,
    zeros,
)

__all__ = [
    "Context",
    "Function",
    "GradcheckError",
    "Tensor",
    "arange",
    "enable_grad",
    "from_dlpack",
    "get_rng_state",
    "gradcheck",
    "is_grad_enabled",
    "manual_seed",
    "no_grad",
    "ones",
    "randn",
    "set_grad_enabled",
    "set_rng_state",
    "tensor",
    "zeros",
]
