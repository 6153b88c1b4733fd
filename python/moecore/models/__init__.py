"""Models: the MoE transformer language model and its configuration."""

from __future__ import annotations

from moecore.models.config import ModelConfig
from moecore.models.transformer import MoETransformer

__all__ = ["ModelConfig", "MoETransformer"]
