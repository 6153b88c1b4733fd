"""AdamW: Adam with decoupled weight decay; on CPU one fused Rust kernel per step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of
from moecore.kernels.adamw import adamw_kernels
from moecore.optim.optimizer import Optimizer


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
            # One kernel call per (implementation, step count): the Rust kernel updates all
            # of a group's float32 CPU tensors in one parallel call.
            batches: dict[tuple[Any, int], list[Tensor]] = {}
            for p in self.params_with_grad(group):
                st = self.state_for(p)
                if not st:
                    xp = xp_of(p.data)
                    st.update(
                        step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data)
                    )
                st["step"] += 1
                batches.setdefault((adamw_kernels(p.data, p.grad), st["step"]), []).append(p)
            beta1, beta2 = group["betas"]
            for (kernels, step), params in batches.items():
                states = [self.state_for(p) for p in params]
                kernels.adamw_step(
                    [p.data for p in params],
                    [p.grad for p in params],
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=step,
                )
