"""Pipeline parallelism: schedules as data (:mod:`.schedule`, from the Rust core) and the
engine that executes one (:class:`PipelineEngine`)."""

from __future__ import annotations

from moecore.distributed.pipeline.engine import PipelineEngine, StageRunner
from moecore.distributed.pipeline.schedule import KINDS, Schedule, Step, schedule, simulate

__all__ = ["KINDS", "PipelineEngine", "Schedule", "StageRunner", "Step", "schedule", "simulate"]
