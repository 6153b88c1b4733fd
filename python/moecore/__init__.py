"""moecore: Mixture-of-Experts training with a Rust core.

The runtime pieces are usable alone on plain arrays: :mod:`moecore.pool` (memory pool),
and, as they land, the compressor, the sparse kernels and the communication scheduler.
"""

from __future__ import annotations

from moecore import errors
from moecore._core import build_info

__version__: str = build_info()["version"]

__all__ = ["__version__", "errors"]
