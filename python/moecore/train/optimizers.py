"""The trainer's optimizer choice (``optimizer = "adamw" | "adafactor" | "sgd"``)."""

from __future__ import annotations

from typing import Any

from moecore import nn, optim

OPTIMIZERS = ("adamw", "adafactor", "sgd")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and embeddings only, not on norms and biases (as GPT-2)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, config: Any) -> optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over :func:`decay_groups`, at ``config.lr``
    (the schedule then drives it):

    - ``"adamw"``: AdamW with ``beta1``, ``beta2``, ``eps``, decoupled weight decay;
    - ``"adafactor"``: Adafactor at the run's learning rate (no relative step, no parameter
      scaling, so the schedule means what it means for AdamW), first moment ``beta1``;
    - ``"sgd"``: SGD with momentum ``beta1`` (weight decay as an L2 term, PyTorch's rule).
    """
    groups = decay_groups(model, config.weight_decay)
    name = config.optimizer
    if name == "adamw":
        return optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    if name == "adafactor":
        return optim.Adafactor(
            groups,
            lr=config.lr,
            beta1=config.beta1 or None,
            relative_step=False,
            scale_parameter=False,
        )
    if name == "sgd":
        return optim.SGD(groups, lr=config.lr, momentum=config.beta1)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
