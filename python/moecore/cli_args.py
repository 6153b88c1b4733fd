"""Argument types of the ``moecore`` command: numbers checked as argparse reads them, so a
bad value ends the command with ``moecore <cmd>: error: argument --tokens: …`` (exit 2)
before anything is loaded."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, low: float, inclusive: bool) -> Callable[[str], int | float]:
    sign = "≥" if inclusive else ">"
    name = "an integer" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"must be {sign} {low:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} {sign} {low:g}"
    return parse


#: An integer ≥ 1 (counts: tokens, ranks, workers, top-k).
positive_int = _number(int, 1, True)
#: An integer ≥ 0 (seeds, warm-up steps).
non_negative_int = _number(int, 0, True)
#: A finite number > 0 (bandwidths, sizes).
positive_float = _number(float, 0, False)
#: A finite number ≥ 0 (latencies, temperatures).
non_negative_float = _number(float, 0, True)
