"""The exceptions moecore raises.

Each subclasses the builtin a user would already catch (``ValueError``, ``MemoryError``,
``RuntimeError``), so generic handlers keep working.
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
    "CorruptPayload",
    "InternalError",
    "NonFiniteGradient",
    "PoolMisuse",
    "PoolOutOfMemory",
    "SchedulerMisuse",
]
