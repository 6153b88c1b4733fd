"""Adafactor (Shazeer & Stern, 2018): factored second moments, a memory-saving optimizer.

For a matrix of shape [n, m] it keeps a row vector [n] and a column vector [m] of squared
gradient averages instead of a full [n, m] second moment; vectors keep the full moment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from moecore.backend import xp_of
from moecore.optim.optimizer import Optimizer


class Adafactor(Optimizer):
    """Adafactor with the options of the paper and of the common implementations.

    Args:
        params: parameters or parameter groups.
        lr: external learning rate; None uses the relative step size
            ``min(1e-2, 1/sqrt(step))`` (times the parameter RMS when ``scale_parameter``).
        eps: (eps1 added to squared gradients, eps2 floor of the parameter RMS).
        clip_threshold: the update's RMS is clipped to this value.
        decay_rate: second-moment decay ``beta2_t = 1 - step ** decay_rate``.
        beta1: first-moment decay, or None for no first moment (the memory-saving default).
        weight_decay: decoupled weight decay, times the learning rate.
        scale_parameter: scale the relative step by the parameter RMS.
        relative_step: use the relative step size (requires ``lr=None``).
    """

    state_keys = ("step", "exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError(
                "Adafactor: pass lr=None with relative_step=True, or relative_step=False"
            )
        if lr is None and not relative_step:
            raise ValueError("Adafactor: relative_step=False needs a learning rate")
        super().__init__(
            params,
            {
                "lr": lr,
                "eps": tuple(eps),
                "clip_threshold": clip_threshold,
                "decay_rate": decay_rate,
                "beta1": beta1,
                "weight_decay": weight_decay,
                "scale_parameter": scale_parameter,
                "relative_step": relative_step,
            },
        )

    @staticmethod
    def _rms(x: Any) -> float:
        return float(xp_of(x).sqrt((x * x).mean())) if x.size else 0.0

    def _step_size(self, group: dict[str, Any], step: int, param: Any) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            lr = min(1e-2, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            lr *= max(group["eps"][1], self._rms(param))
        return lr

    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            eps1, _ = group["eps"]
            for p in self.params_with_grad(group):
                g = p.grad
                xp = xp_of(g)
                st = self.state_for(p)
                factored = g.ndim >= 2
                if not st:
                    st["step"] = 0
                    if factored:
                        st["exp_avg_sq_row"] = xp.zeros(g.shape[:-1], dtype=g.dtype)
                        st["exp_avg_sq_col"] = xp.zeros(g.shape[:-2] + g.shape[-1:], dtype=g.dtype)
                    else:
                        st["exp_avg_sq"] = xp.zeros_like(g)
                    if group["beta1"] is not None:
                        st["exp_avg"] = xp.zeros_like(g)
                st["step"] += 1
                t = st["step"]
                lr = self._step_size(group, t, p.data)
                beta2 = 1.0 - t ** group["decay_rate"]
                sq = g * g + eps1
                if factored:
                    row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
                    row *= beta2
                    row += (1 - beta2) * sq.mean(axis=-1)
                    col *= beta2
                    col += (1 - beta2) * sq.mean(axis=-2)
                    # v ≈ row ⊗ col / mean(row): the rank-1 reconstruction of the paper.
                    r = 1.0 / xp.sqrt(row / row.mean(axis=-1, keepdims=True))
                    c = 1.0 / xp.sqrt(col)
                    update = g * r[..., :, None] * c[..., None, :]
                else:
                    v = st["exp_avg_sq"]
                    v *= beta2
                    v += (1 - beta2) * sq
                    update = g / xp.sqrt(v)
                update /= max(1.0, self._rms(update) / group["clip_threshold"])
                update *= lr
                if group["beta1"] is not None:
                    m = st["exp_avg"]
                    m *= group["beta1"]
                    m += (1 - group["beta1"]) * update
                    update = m
                if group["weight_decay"]:
                    p.data -= group["weight_decay"] * lr * p.data
                p.data -= update.astype(p.dtype, copy=False)
