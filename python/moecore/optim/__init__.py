"""Optimizers (SGD, AdamW, Adafactor), learning-rate schedules and gradient clipping."""

from __future__ import annotations

from moecore.optim.adafactor import Adafactor
from moecore.optim.adamw import AdamW
from moecore.optim.agc import adaptive_clip_grad_
from moecore.optim.clip import clip_grad_norm_, grad_norm
from moecore.optim.loss_scaler import LossScaler
from moecore.optim.master_weights import MasterWeights
from moecore.optim.optimizer import Optimizer
from moecore.optim.schedule import LRScheduler, constant, linear, warmup_cosine
from moecore.optim.sgd import SGD

__all__ = [
    "SGD",
    "Adafactor",
    "AdamW",
    "LRScheduler",
    "LossScaler",
    "MasterWeights",
    "Optimizer",
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "constant",
    "grad_norm",
    "linear",
    "warmup_cosine",
]
