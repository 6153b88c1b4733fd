"""The training monitor: flags loss spikes and non-finite steps, stops a diverging run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moecore.errors import TrainingDiverged


@dataclass
class Monitor:
    """Keeps an exponential moving average of the loss; a finite loss above
    ``spike_factor`` × the average is a spike (its update skipped when ``skip_spikes``);
    ``max_bad_steps`` non-finite steps in a row stop the run."""

    spike_factor: float = 3.0
    max_bad_steps: int = 5
    skip_spikes: bool = False
    ema: float | None = None
    bad_in_a_row: int = 0
    skipped: int = 0
    spikes: int = 0
    decay: float = 0.95
    warmup: int = 10
    seen: int = 0

    def observe(self, loss: float, grad_norm: float) -> dict[str, Any]:
        """Judges one step; returns flags for the metrics record (``skipped``: do not apply
        this update; ``spike``: the loss jumped)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.bad_in_a_row += 1
            self.skipped += 1
            return {"skipped": True, "spike": False}
        self.bad_in_a_row = 0
        self.seen += 1
        spike = (
            self.ema is not None and self.seen > self.warmup and loss > self.spike_factor * self.ema
        )
        if spike:
            self.spikes += 1
        self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss
        return {"skipped": bool(spike and self.skip_spikes), "spike": bool(spike)}

    def check(self, loss: float, grad_norm: float) -> None:
        """Raises :class:`TrainingDiverged` once ``max_bad_steps`` steps in a row were bad."""
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(
                f"stopping: {self.bad_in_a_row} consecutive steps had a non-finite loss or "
                f"gradient (last loss {loss}, grad norm {grad_norm}); lower the learning rate "
                "or check the data"
            )

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints."""
        return {k: getattr(self, k) for k in ("ema", "bad_in_a_row", "skipped", "spikes", "seen")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        for k, v in state.items():
            setattr(self, k, v)
