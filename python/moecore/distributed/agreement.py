"""Checking that every rank holds the same model and settings before the ranks start pairing
collectives.

A rank with another model (another config, a layer added on one rank only) or other
communication settings (another bucket size, compression on one rank only) would otherwise
pair broadcasts, all-reduces and all-gathers of different sizes: an MPI error or a corrupt
payload deep inside a collective at best, a rank waiting forever at worst (measured: ranks
with different ``bucket_mb`` hung). PyTorch's DDP checks the parameters at construction.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from moecore.distributed.group import Group

__all__ = ["check_ranks_agree"]


def check_ranks_agree(
    group: Group,
    who: str,
    named: list[tuple[str, Any]],
    settings: dict[str, Any] | None = None,
    why: str = "so their collectives would not match",
) -> None:
    """Raises ``ValueError`` on every rank of ``group`` unless all ranks hold parameters of
    the same names, shapes and dtypes in the same order (``named``: ``(name, parameter)``
    pairs, each with a ``.data`` array) and the same ``settings`` (JSON-able values); the
    message, which ``who`` starts, names the first difference (and ``why`` settings must
    agree). One all-gather of a short description per rank."""
    if group.size == 1:
        return
    mine = {
        "parameters": [[name, list(p.data.shape), str(p.data.dtype)] for name, p in named],
        "settings": settings or {},
    }
    blob = np.frombuffer(json.dumps(mine).encode(), dtype=np.uint8)
    parts = [json.loads(bytes(part).decode()) for part in group.allgatherv(blob)]
    ref = parts[0]
    for rank, theirs in enumerate(parts[1:], start=1):
        if theirs["parameters"] != ref["parameters"]:
            raise ValueError(
                f"{who}: the ranks' models differ, so their gradients cannot be averaged: "
                f"{_first_difference(ref['parameters'], theirs['parameters'], rank)}"
            )
    for rank, theirs in enumerate(parts[1:], start=1):
        for key in sorted(set(ref["settings"]) | set(theirs["settings"])):
            mine_value, their_value = ref["settings"].get(key), theirs["settings"].get(key)
            if mine_value != their_value:
                raise ValueError(
                    f"{who}: the ranks' settings differ, {why}: {key} is {mine_value!r} on "
                    f"rank 0 but {their_value!r} on rank {rank}"
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
