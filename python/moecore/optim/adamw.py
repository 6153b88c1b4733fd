"""AdamW: Adam with decoupled weight decay; on CPU one fused Rust kernel per step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from moecore import _core
from moecore.autograd.tensor import Tensor
from moecore.backend import is_cupy_array, xp_of
from moecore.optim.optimizer import Optimizer


def _fusable(p: Tensor) -> bool:
    return (
        isinstance(p.data, np.ndarray)
        and p.data.dtype == np.float32
        and p.data.flags.c_contiguous
        and p.data.flags.writeable
    )


def _cuda_fusable(p: Tensor) -> bool:
    return (
        is_cupy_array(p.data)
        and p.data.dtype == np.float32
        and p.data.flags.c_contiguous
        and is_cupy_array(p.grad)
        and p.grad.dtype == np.float32
        and p.grad.flags.c_contiguous
    )


class AdamW(Optimizer):
    """AdamW (Loshchilov & Hutter), the same update as ``torch.optim.AdamW``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: decay rates of the first and second moment estimates.
        eps: added to the denominator.
        weight_decay: decoupled weight decay (``p ← p·(1 − lr·wd)``).

    float32 CPU parameters are updated by one fused in-place Rust kernel over all of them,
    in parallel with the GIL released; float32 CuPy parameters by the fused CUDA kernel of
    ``cuda/adamw.cu`` (bit-identical to the CPU step); other dtypes use the same math in
    numpy/CuPy.
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        for b in betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"AdamW: eps must be positive, got {eps}")
        super().__init__(
            params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        )

    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            fused: dict[int, list[Tensor]] = {}
            for p in self.params_with_grad(group):
                st = self.state_for(p)
                if not st:
                    xp = xp_of(p.data)
                    st.update(
                        step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data)
                    )
                st["step"] += 1
                if _fusable(p):
                    fused.setdefault(st["step"], []).append(p)
                elif _cuda_fusable(p):
                    self._update_cuda(p, st, group)
                else:
                    self._update_array(p, st, group)
            beta1, beta2 = group["betas"]
            for step, params in fused.items():
                states = [self.state_for(p) for p in params]
                _core.adamw_step(
                    [p.data for p in params],
                    [np.ascontiguousarray(p.grad, dtype=np.float32) for p in params],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    lr=float(group["lr"]),
                    beta1=float(beta1),
                    beta2=float(beta2),
                    eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    step=int(step),
                )

    @staticmethod
    def _update_cuda(p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        beta1, beta2 = group["betas"]
        cuda.adamw_step(
            p.data,
            p.grad,
            st["exp_avg"],
            st["exp_avg_sq"],
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            step=int(st["step"]),
        )

    @staticmethod
    def _update_array(p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd, t = group["lr"], group["eps"], group["weight_decay"], st["step"]
        g, m, v = p.grad, st["exp_avg"], st["exp_avg_sq"]
        p.data *= 1 - lr * wd
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        denom = (v**0.5) / (1 - beta2**t) ** 0.5 + eps
        p.data -= (lr / (1 - beta1**t)) * m / denom
