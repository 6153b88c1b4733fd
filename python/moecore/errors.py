"""The exceptions moecore raises, all importable from here.

Each subclasses the builtin a user would already catch (``ValueError``, ``MemoryError``,
``RuntimeError``, ``AssertionError``), so generic handlers keep working. The Rust core's come
from the extension (``rust/py/errors.rs``); the Python layer's are defined here and imported
by the modules that raise them, so ``moecore.train.ConfigError`` and the like stay the same
class.
"""

from __future__ import annotations

from moecore._core import (
    CorruptPayload,
    InternalError,
    NonFiniteGradient,
    PoolMisuse,
    PoolOutOfMemory,
    SchedulerMisuse,
)

__all__ = [
    # the Rust core's
    "CorruptPayload",
    "InternalError",
    "NonFiniteGradient",
    "PoolMisuse",
    "PoolOutOfMemory",
    "SchedulerMisuse",
    # the Python layer's
    "CheckpointDamaged",
    "CheckpointError",
    "CompileFailure",
    "ConfigError",
    "DataError",
    "GradcheckError",
    "NonFiniteInput",
    "SafetensorsError",
    "TrainingDiverged",
    "UnusedParameters",
]


class ConfigError(ValueError):
    """The run configuration has unknown keys, wrong types or impossible values."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid run configuration:\n  - " + "\n  - ".join(problems))


class DataError(ValueError):
    """The training data is missing, empty, too short or malformed."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or incompatible; the message names the file."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint file does not match its manifest (bit rot, truncation, a partial copy):
    the message names the file, what the manifest expects and what was found."""


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt, or holds something numpy cannot read."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class GradcheckError(AssertionError):
    """Raised by :func:`moecore.autograd.gradcheck` when analytic and numeric gradients disagree."""


class NonFiniteInput(ValueError):
    """A value to quantize (an fp8 tile or block) is inf or NaN: it has no scale."""


class CompileFailure(RuntimeError):
    """NVRTC or ptxas reported an error or a warning."""


class UnusedParameters(RuntimeError):
    """ZeRO stage 3 met a module whose forward did not run: its parameters were never
    gathered (the same on every rank: the modules run the same everywhere)."""
