"""Which elements of each bucket a rank owns under ZeRO, and the pieces of parameters they
cover."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moecore.nn import Parameter

__all__ = ["Piece", "owned_range", "reduce_scatter_counts"]


def owned_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """Elements ``[lo, hi)`` of a bucket of ``numel`` that ``rank`` owns: parts of
    ``ceil(numel / world)``, the last ones shorter or empty."""
    chunk = -(-numel // world)
    return min(rank * chunk, numel), min((rank + 1) * chunk, numel)


def reduce_scatter_counts(numel: int, lo: int, hi: int, world: int) -> list[int]:
    """How many of elements ``[lo, hi)`` of a bucket each rank owns (in rank order, they
    are consecutive: the ``counts`` of a reduce-scatter of those elements)."""
    counts = []
    for r in range(world):
        a, b = owned_range(numel, r, world)
        counts.append(max(0, min(hi, b) - max(lo, a)))
    return counts


@dataclass
class Piece:
    """This rank's elements ``[start, start + numel)`` (flat) of parameter ``index``, at
    ``[lo, lo + numel)`` of bucket ``bucket``. ``tensor`` is a Parameter viewing them in
    the model's parameter (what the sharded optimizer updates in place)."""

    index: int
    bucket: int
    lo: int
    start: int
    numel: int
    tensor: Parameter

    @classmethod
    def of(cls, param: Any, index: int, bucket: int, lo: int, start: int, numel: int) -> Piece:
        """The piece of ``param`` (its ``.data`` a C-contiguous float32 array)."""
        flat = param.data.reshape(-1)
        if not np.shares_memory(flat, param.data):
            raise ValueError(f"ZeRO: parameter {index} is not contiguous in memory")
        return cls(index, bucket, lo, start, numel, Parameter(flat[start : start + numel]))
