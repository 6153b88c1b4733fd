"""ZeRO: optimizer state (stage 1) and gradients (stage 2) sharded over data-parallel ranks.

:class:`ZeRO` is a :class:`moecore.distributed.DataParallel` whose ranks each own 1/P of
every gradient bucket (rank ``r`` the ``r``-th of ``P`` equal parts, the last ones shorter
or empty). Each rank keeps the optimizer state of its parts only (:class:`ShardedOptimizer`
over views of them) and, after its update, all-gathers the parameters. Stage 1 all-reduces
the gradients as plain data parallelism does; stage 2 reduce-scatters them bucket by bucket
during backward, on the same scheduler and overlap, so each rank keeps only its parts.
"""

from __future__ import annotations

from moecore.distributed.zero.optimizer import ShardedOptimizer
from moecore.distributed.zero.wrapper import STAGES, ZeRO

__all__ = ["STAGES", "ShardedOptimizer", "ZeRO"]
