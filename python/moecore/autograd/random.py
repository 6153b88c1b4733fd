"""The default random generators (one per device), seeded by ``moecore.manual_seed``."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.backend import xp_for

_generators: dict[str, Any] = {}
_seed: int | None = None


def manual_seed(seed: int) -> None:
    """Seeds every device's default generator (parameter init, ``randn``, dropout)."""
    global _seed
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _seed = int(seed)
    _generators.clear()


def generator(device: str = "cpu") -> Any:
    """The default generator of ``device``: ``numpy.random.Generator`` (or CuPy's)."""
    g = _generators.get(device)
    if g is None:
        xp = xp_for(device)
        g = xp.random.default_rng(_seed)
        _generators[device] = g
    return g


def get_rng_state() -> dict[str, Any]:
    """The CPU generator's state (a plain dict), for checkpoints."""
    return {"seed": _seed, "cpu": generator("cpu").bit_generator.state}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`get_rng_state` returned."""
    global _seed
    _seed = state.get("seed")
    _generators.clear()
    generator("cpu").bit_generator.state = state["cpu"]
