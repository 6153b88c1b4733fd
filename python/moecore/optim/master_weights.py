"""fp32 master weights with low-precision compute copies.

A parameter's array *is* its float32 master: the optimizer steps it, gradient clipping and
the optimizer state see float32, and a checkpoint saves it as it is, so a run resumes in any
``dtype``. Around the forward and backward passes, :meth:`MasterWeights.compute_copies` puts
in each parameter the copy the low-precision step computes from — for a bf16 run a real
``ml_dtypes.bfloat16`` array, otherwise the master rounded to the compute format in a
float32 array (:func:`moecore.kernels.lowp.round_to`) — and puts the master back after.
Gradients arrive in float32 (see :mod:`moecore.nn.precision`), so the optimizer step is
float32 throughout, as the DeepSeek-V3 recipe keeps it.

Keeping the master in the parameter between steps rather than in the optimizer's state lets
everything that reads parameters outside a step (checkpoints, checksums, sharding of
optimizer state) work unchanged whatever the compute format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from moecore.autograd.tensor import Tensor
from moecore.kernels.lowp import is_low_precision, round_to


class MasterWeights:
    """The compute copies of a set of float32 parameters.

    Args:
        params: the parameters (float32 masters).
        dtype: the compute format (``ml_dtypes.bfloat16``, ``np.float16``…); float32 means
            no copies.
        copy_fn: makes one parameter's compute copy from its master (default: round to
            ``dtype``); the fp8 recipe passes its block quantization for the GEMM weights.

    Examples:
        >>> masters = MasterWeights(model.parameters(), ml_dtypes.bfloat16)
        >>> with masters.compute_copies():
        ...     model(x, y).backward()
        >>> optimizer.step()   # on the float32 masters
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        dtype: Any,
        copy_fn: Callable[[Tensor], np.ndarray | None] | None = None,
    ) -> None:
        self.params = list(params)
        self.dtype = np.dtype(dtype)
        self.copy_fn = copy_fn if copy_fn is not None else self._rounded

    def _rounded(self, p: Tensor) -> np.ndarray | None:
        return round_to(p.data, self.dtype) if is_low_precision(self.dtype) else None

    @contextlib.contextmanager
    def compute_copies(self) -> Iterator[None]:
        """Within the block each parameter holds its compute copy (a new array; the master
        is not touched); after it, its master again."""
        swapped: list[tuple[Tensor, Any]] = []
        try:
            for p in self.params:
                copy = self.copy_fn(p)
                if copy is not None:
                    swapped.append((p, p.data))
                    p.data = copy
            yield
        finally:
            for p, master in swapped:
                p.data = master
