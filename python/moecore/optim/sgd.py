"""SGD with momentum and Nesterov momentum (PyTorch's update rule)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from moecore.optim.optimizer import Optimizer


class SGD(Optimizer):
    """Stochastic gradient descent, the same update as ``torch.optim.SGD``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum factor (0 disables it).
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and no dampening).
    """

    state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if momentum < 0:
            raise ValueError(f"SGD: invalid momentum {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening 0")
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
            },
        )

    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            lr, mom, damp, wd = (
                group["lr"],
                group["momentum"],
                group["dampening"],
                group["weight_decay"],
            )
            for p in self.params_with_grad(group):
                g = p.grad
                if wd:
                    g = g + wd * p.data
                if mom:
                    st = self.state_for(p)
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = g.copy()
                    else:
                        buf *= mom
                        buf += (1 - damp) * g
                    g = g + mom * buf if group["nesterov"] else buf
                p.data -= lr * g
