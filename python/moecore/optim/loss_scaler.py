"""Dynamic loss scaling for fp16 training, with ``torch.amp.GradScaler``'s rules.

fp16 has 5 exponent bits: gradients below 2⁻²⁴ flush to zero, above 65504 overflow to inf.
The loss is multiplied by a scale before backward so the gradients live in fp16's range;
they are divided by it (:meth:`LossScaler.unscale_`) before clipping and the step. A step
whose gradients hold an inf or NaN is skipped and the scale backs off; after
``growth_interval`` finite steps in a row the scale grows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of


class LossScaler:
    """The loss scale and its update rule (``torch.amp.GradScaler``'s defaults).

    Args:
        init_scale: the first scale.
        growth_factor: the scale is multiplied by it after ``growth_interval`` finite steps
            in a row.
        backoff_factor: the scale is multiplied by it after a step with non-finite
            gradients (that step is skipped and the count of finite steps restarts).
        growth_interval: finite steps in a row before the scale grows.

    Examples:
        >>> scaler = LossScaler()
        >>> (loss * scaler.scale).backward()
        >>> found_inf = scaler.unscale_(model.parameters())
        >>> if not found_inf:
        ...     optimizer.step()
        >>> scaler.update(found_inf)
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"LossScaler: init_scale must be a positive number, got {init_scale}")
        if growth_factor <= 1.0:
            raise ValueError(f"LossScaler: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"LossScaler: backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"LossScaler: growth_interval must be ≥ 1, got {growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        #: Finite steps since the last growth or back-off.
        self.growth_tracker = 0

    def unscale_(self, params: Iterable[Tensor]) -> bool:
        """Divides every gradient by the scale, in place (multiplied by the float32
        reciprocal, as PyTorch does); returns whether any gradient holds an inf or NaN."""
        inv = np.float32(1.0 / self.scale)
        found_inf = False
        for p in params:
            g = p.grad
            if g is None:
                continue
            g *= g.dtype.type(inv)
            if not found_inf:
                found_inf = not bool(xp_of(g).isfinite(g).all())
        return found_inf

    def update(self, found_inf: bool) -> None:
        """The scale after a step: backed off after non-finite gradients, grown after
        ``growth_interval`` finite steps in a row."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = self.scale * self.growth_factor
            if math.isfinite(grown):
                self.scale = grown
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints."""
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
