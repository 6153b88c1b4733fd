"""Learning-rate schedules: warm-up + cosine, linear, constant."""

from __future__ import annotations

import math
from typing import Any

from moecore.optim.optimizer import Optimizer


def warmup_cosine(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps to ``base_lr``, then a cosine decay reaching
    ``min_lr`` at step ``total`` and staying there. ``step`` counts from 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def linear(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warm-up, then a linear decay to ``min_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr + (min_lr - base_lr) * progress


def constant(
    step: int, base_lr: float, warmup: int = 0, total: int = 0, min_lr: float = 0.0
) -> float:
    """Linear warm-up (if any), then ``base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr


SCHEDULES = {"cosine": warmup_cosine, "linear": linear, "constant": constant}


class LRScheduler:
    """Sets every group's ``lr`` from a named schedule at each :meth:`step`.

    Args:
        optimizer: the optimizer whose groups it drives (their current lr is the base lr).
        kind: ``"cosine"``, ``"linear"`` or ``"constant"``.
        warmup: warm-up steps.
        total: step at which the decay ends.
        min_lr: final learning rate (or ``min_ratio`` × base, when given).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        kind: str = "cosine",
        warmup: int = 0,
        total: int = 1,
        min_lr: float = 0.0,
        min_ratio: float | None = None,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {sorted(SCHEDULES)}")
        if warmup < 0 or total < 0:
            raise ValueError(f"warmup and total must be non-negative, got {warmup}, {total}")
        self.optimizer, self.kind, self.warmup, self.total = optimizer, kind, warmup, total
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.min_lrs = [b * min_ratio if min_ratio is not None else min_lr for b in self.base_lrs]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        fn = SCHEDULES[self.kind]
        for g, base, low in zip(self.optimizer.param_groups, self.base_lrs, self.min_lrs):
            g["lr"] = fn(self.last_step, base, self.warmup, self.total, low)

    def step(self) -> None:
        """Advances one step and sets the new learning rates."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rate of each group now."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position and settings."""
        return {
            "last_step": self.last_step,
            "base_lrs": list(self.base_lrs),
            "min_lrs": list(self.min_lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output."""
        self.last_step = int(state["last_step"])
        self.base_lrs, self.min_lrs = list(state["base_lrs"]), list(state["min_lrs"])
        self._apply()
