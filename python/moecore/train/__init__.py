"""Training: run configuration, trainer, checkpoints, metrics, progress, generation."""

from __future__ import annotations

from moecore.train.checkpoint import CheckpointError
from moecore.train.config import PRESETS, ConfigError, RunConfig, build_config, parse_overrides
from moecore.train.monitor import TrainingDiverged
from moecore.train.trainer import Trainer, TrainResult, build_model, build_optimizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "RunConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "build_config",
    "build_model",
    "build_optimizer",
    "parse_overrides",
]
