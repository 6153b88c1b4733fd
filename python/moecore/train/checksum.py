"""A cheap fingerprint of a model's state, comparable between layouts: for every tensor of
the state dict (parameters and buffers such as the router bias), its float64 sum and sum of
squares. Under expert parallelism a rank holds some of the experts; their sums are summed
over the expert-parallel group, so every layout of the same run writes the same numbers up
to float64 rounding (and the float32 differences of its training).

The trainer writes it into each ``metrics.jsonl`` record when ``param_checksum = true``;
``tests/parallel_harness.py`` compares two runs' records with it."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import nn
from moecore.train.parallel import Layout

__all__ = ["param_checksums"]


def param_checksums(model: nn.Module, layout: Layout) -> dict[str, list[float]]:
    """``{name: [Σx, Σx²]}`` in float64 over the whole (unsharded) tensor of each entry of
    ``model.state_dict()``: a collective over the expert-parallel group when experts are
    sharded (every rank of it must call it), local otherwise."""
    names: list[str] = []
    sums = []
    for name, value in model.state_dict().items():
        v = np.asarray(_host(value)).reshape(-1).astype(np.float64)
        names.append(name)
        sums.append((v.sum(), (v * v).sum()))
    out = np.array(sums, dtype=np.float64).reshape(len(names), 2)
    sharded = [i for i, n in enumerate(names) if n in layout.sharded]
    if sharded:
        part = np.ascontiguousarray(out[sharded])
        layout.ep_group.allreduce(part)
        out[sharded] = part
    return {n: [float(s), float(q)] for n, (s, q) in zip(names, out)}


def _host(value: Any) -> Any:
    """A NumPy view (or copy, for a device array) of a state-dict value."""
    get = getattr(value, "get", None)
    return get() if callable(get) and not isinstance(value, np.ndarray) else value
