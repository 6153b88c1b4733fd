"""Kernels: the array-level implementations of each op family, and the one place that
chooses between them.

One module per family — :mod:`.moe` (its interface, :class:`~.moe.MoEKernels`), :mod:`.bsr`,
:mod:`.topk`, :mod:`.adamw`, :mod:`.attention`, :mod:`.norm`, :mod:`.activation` — takes
and returns plain numpy or CuPy arrays. Each family has an implementation per
(device, dtype): the Rust one of ``moecore._core`` for float32 numpy, the CUDA one of
:mod:`moecore.kernels.cuda` (imported lazily) for float32 CuPy, and an array-module (``xp``)
one where the family has one (float64, e.g. for gradient checks).
:mod:`.registry` holds the table and :func:`~.registry.select`; an unsupported
(family, device, dtype) raises ``NotImplementedError`` naming all three.

Nothing here imports ``ops``, ``nn`` or ``autograd``.
"""

from __future__ import annotations

from moecore.kernels.moe import MoEKernels, moe_kernels_for
from moecore.kernels.registry import FAMILIES, select, select_for

__all__ = ["FAMILIES", "MoEKernels", "moe_kernels_for", "select", "select_for"]
