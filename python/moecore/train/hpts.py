"""The HPTS precision scheduler (``precision_schedule = "hpts"``): each step, the format of
each *sensitive* parameter group's compute copy follows its gradient norm.

Parameters fall in three classes:

- **stable** — the norms' weights and biases: always float32 (as without the scheduler);
- **sensitive** — the MoE router and the residual-path projections (attention's output
  projection, the FFN's down projection, the MoE experts' second matrix ``w2``), grouped per
  block: ``blocks.<i>.router`` and ``blocks.<i>.residual``;
- **robust** — every other weight: always the run's low format (``dtype``).

A sensitive group whose gradient norm was ``g`` at the last step computes the next step in
fp16 when ``g < t/2``, bf16 when ``g < t``, float32 otherwise (``t`` = ``hpts_threshold``,
default 0.1); the first step, with no gradient yet, in float32. The norm is measured after
the loss scale is divided out and before clipping. Decisions are logged per step in
``metrics.jsonl`` (``hpts``: group → format).
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_dtypes
import numpy as np

from moecore import nn
from moecore.optim import grad_norm

#: The format names of the decisions → dtypes.
FORMATS: dict[str, Any] = {
    "fp16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}

_SENSITIVE = (
    (re.compile(r"^(blocks\.\d+)\.ffn\.router$"), "router"),
    (re.compile(r"^(blocks\.\d+)\.attn\.proj\.weight$"), "residual"),
    (re.compile(r"^(blocks\.\d+)\.ffn\.down\.weight$"), "residual"),
    (re.compile(r"^(blocks\.\d+)\.ffn\.w2$"), "residual"),
)


def decide(g: float, threshold: float) -> str:
    """The format of a sensitive group whose gradient norm is ``g``: fp16 below
    ``threshold/2``, bf16 below ``threshold``, float32 otherwise (also for a non-finite
    ``g``)."""
    if not math.isfinite(g):
        return "float32"
    if g < threshold / 2:
        return "fp16"
    if g < threshold:
        return "bf16"
    return "float32"


def sensitive_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """``"blocks.<i>.router"`` / ``"blocks.<i>.residual"`` → that group's parameters."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        for pattern, kind in _SENSITIVE:
            m = pattern.match(name)
            if m:
                groups.setdefault(f"{m.group(1)}.{kind}", []).append(p)
    return groups


class HPTSScheduler:
    """Holds the current decisions; :attr:`scheduled` (``id(parameter)`` → dtype) is what
    the compute copies read.

    Args:
        model: the model.
        threshold: ``t``.
    """

    def __init__(self, model: nn.Module, threshold: float) -> None:
        if not threshold > 0:
            raise ValueError(f"hpts_threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.groups = sensitive_groups(model)
        self.decisions = dict.fromkeys(self.groups, "float32")
        self.scheduled: dict[int, Any] = {}
        self._apply()

    def _apply(self) -> None:
        for group, params in self.groups.items():
            for p in params:
                self.scheduled[id(p)] = FORMATS[self.decisions[group]]

    def observe(self) -> dict[str, str]:
        """Decides each group's format for the next step from its current gradients;
        returns the decisions this step ran with (for the metrics)."""
        ran = dict(self.decisions)
        for group, params in self.groups.items():
            self.decisions[group] = decide(grad_norm(params), self.threshold)
        self._apply()
        return ran

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints."""
        return {"decisions": dict(self.decisions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.decisions.update(
            {k: v for k, v in state.get("decisions", {}).items() if k in self.decisions}
        )
        self._apply()
