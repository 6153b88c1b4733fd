"""Checking that every rank holds the same model before the ranks start pairing collectives.

A rank with another model (another config, a layer added on one rank only) would otherwise
pair broadcasts and all-reduces of different sizes: an MPI error deep inside a collective at
best, a rank waiting forever at worst. PyTorch's DDP checks the same at construction.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from moecore.dist.group import Group

__all__ = ["check_same_parameters"]


def check_same_parameters(group: Group, named: list[tuple[str, Any]], who: str) -> None:
    """Raises ``ValueError`` on every rank of ``group`` unless all ranks hold parameters of
    the same names, shapes and dtypes in the same order; the message names the first
    difference. ``named`` holds ``(name, parameter)`` pairs (each with a ``.data`` array);
    ``who`` starts the message. One all-gather of a short description per rank."""
    if group.size == 1:
        return
    mine = [[name, list(p.data.shape), str(p.data.dtype)] for name, p in named]
    blob = np.frombuffer(json.dumps(mine).encode(), dtype=np.uint8)
    parts = [json.loads(bytes(part).decode()) for part in group.allgatherv(blob)]
    for rank, theirs in enumerate(parts[1:], start=1):
        if theirs != parts[0]:
            raise ValueError(
                f"{who}: the ranks' models differ, so their gradients cannot be averaged: "
                f"{_first_difference(parts[0], theirs, rank)}"
            )


def _describe(entry: list[Any]) -> str:
    name, shape, dtype = entry
    return f"{name!r} of shape {shape} {dtype}"


def _first_difference(ref: list[list[Any]], other: list[list[Any]], rank: int) -> str:
    for i, (a, b) in enumerate(zip(ref, other, strict=False)):
        if a != b:
            return f"parameter {i} is {_describe(a)} on rank 0 but {_describe(b)} on rank {rank}"
    longer, where = (ref, 0) if len(ref) > len(other) else (other, rank)
    extra = longer[min(len(ref), len(other))]
    return (
        f"rank 0 has {len(ref)} parameters and rank {rank} has {len(other)}; "
        f"the first one only rank {where} has is {_describe(extra)}"
    )
