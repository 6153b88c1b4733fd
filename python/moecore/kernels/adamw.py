"""AdamW kernels on arrays: one update, in place, of a list of parameters (their gradients
and both moment estimates) that share a step count.

Three implementations (:mod:`moecore.kernels.registry` chooses, :func:`adamw_kernels` for
one parameter): :class:`RustAdamW`, one fused parallel call of ``moecore._core`` over every
tensor (float32 numpy, C-contiguous and writable parameters); :class:`CudaAdamW`, the fused
kernel of ``cuda/adamw.cu`` per tensor (float32 CuPy, bit-identical to the CPU step); and
:class:`ArrayAdamW`, the same math in array-module operations (any float dtype). The
hyperparameters are passed as the optimizer holds them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import _core
from moecore.backend import is_cupy_array
from moecore.kernels.registry import select_for


class RustAdamW:
    """The fused AdamW of ``moecore._core`` (float32 numpy)."""

    @staticmethod
    def accepts(p: Any, g: Any = None) -> bool:
        """Whether the Rust kernel updates ``p`` in place: C-contiguous and writable (its
        gradient is converted to contiguous float32 if need be)."""
        return isinstance(p, np.ndarray) and p.flags.c_contiguous and p.flags.writeable

    @staticmethod
    def adamw_step(
        params: list[Any],
        grads: list[Any],
        exp_avgs: list[Any],
        exp_avg_sqs: list[Any],
        *,
        lr: Any,
        beta1: Any,
        beta2: Any,
        eps: Any,
        weight_decay: Any,
        step: int,
        compute_copies: list[Any] | None = None,
    ) -> None:
        """One AdamW step of every tensor, in place, in one parallel call. With
        ``compute_copies`` (one C-contiguous ``ml_dtypes.bfloat16`` array per parameter), the
        same pass writes each updated float32 parameter rounded to bf16 into its copy."""
        copies = None
        if compute_copies is not None:
            from moecore.kernels.bf16 import BF16

            copies = []
            for i, c in enumerate(compute_copies):
                if not (isinstance(c, np.ndarray) and c.dtype == BF16 and c.flags.c_contiguous):
                    raise ValueError(
                        f"compute_copies[{i}]: expected a C-contiguous bfloat16 numpy array"
                    )
                copies.append(c.view(np.uint16))
        _core.adamw_step(
            params,
            [np.ascontiguousarray(g, dtype=np.float32) for g in grads],
            exp_avgs,
            exp_avg_sqs,
            lr=float(lr),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(eps),
            weight_decay=float(weight_decay),
            step=int(step),
            compute_copies=copies,
        )


class _EachTensor:
    """An implementation that updates one tensor per call of its ``tensor_step``."""

    @classmethod
    def adamw_step(
        cls,
        params: list[Any],
        grads: list[Any],
        exp_avgs: list[Any],
        exp_avg_sqs: list[Any],
        *,
        lr: Any,
        beta1: Any,
        beta2: Any,
        eps: Any,
        weight_decay: Any,
        step: int,
        compute_copies: list[Any] | None = None,
    ) -> None:
        """As :meth:`RustAdamW.adamw_step`, one tensor after another (each compute copy
        written from its updated tensor right after it)."""
        copies = [None] * len(params) if compute_copies is None else compute_copies
        if len(copies) != len(params):
            raise ValueError(
                f"compute_copies: got {len(copies)} for {len(params)} params; all must match"
            )
        for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, copies, strict=True):
            cls.tensor_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
            if c is not None:
                c[...] = p.astype(c.dtype)

    @staticmethod
    def tensor_step(
        p: Any, g: Any, m: Any, v: Any, lr: Any, beta1: Any, beta2: Any, eps: Any, wd: Any, t: int
    ) -> None:
        """One AdamW step of one tensor, in place."""
        raise NotImplementedError


class CudaAdamW(_EachTensor):
    """The fused AdamW kernel of ``cuda/adamw.cu`` (float32 CuPy), one launch per tensor."""

    @staticmethod
    def accepts(p: Any, g: Any = None) -> bool:
        """Whether the CUDA kernel takes ``p`` and its gradient: both C-contiguous float32
        CuPy arrays."""
        return (
            p.flags.c_contiguous
            and is_cupy_array(g)
            and g.dtype == np.float32
            and g.flags.c_contiguous
        )

    @staticmethod
    def tensor_step(
        p: Any, g: Any, m: Any, v: Any, lr: Any, beta1: Any, beta2: Any, eps: Any, wd: Any, t: int
    ) -> None:
        """One launch of the fused kernel."""
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        cuda.adamw_step(
            p,
            g,
            m,
            v,
            lr=float(lr),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(eps),
            weight_decay=float(wd),
            step=int(t),
        )


class ArrayAdamW(_EachTensor):
    """AdamW in array-module operations (numpy or CuPy, any float dtype)."""

    @staticmethod
    def tensor_step(
        p: Any, g: Any, m: Any, v: Any, lr: Any, beta1: Any, beta2: Any, eps: Any, wd: Any, t: int
    ) -> None:
        """The update written with array operations, in place."""
        p *= 1 - lr * wd
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        denom = (v**0.5) / (1 - beta2**t) ** 0.5 + eps
        p -= (lr / (1 - beta1**t)) * m / denom


def adamw_kernels(p: Any, g: Any) -> Any:
    """The implementation of AdamW for parameter array ``p`` and its gradient ``g``: chosen
    by ``p``'s device and dtype (the Rust kernel converts a gradient of another dtype)."""
    return select_for("adamw", p) if not is_cupy_array(p) else select_for("adamw", p, g)
