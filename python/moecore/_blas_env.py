"""Environment for numpy's OpenBLAS, set before numpy loads (read once, at its load).

After every BLAS call OpenBLAS keeps its idle worker threads spinning for 2^28 cycles
(about 0.1 s) before they sleep. moecore's Rust kernels (rayon) usually run right after a
numpy matmul, and those spinning threads take the cores from them: measured side by side,
the grouped expert matmul ran at 75 GFLOP/s after numpy calls against 147 GFLOP/s with the
workers sleeping at once (``benches/py/moe_kernels.py``). ``OPENBLAS_THREAD_TIMEOUT=4``
(2^4 cycles, OpenBLAS's minimum) makes them sleep at once; a value the user set is kept,
and nothing changes if numpy was imported before moecore.
"""

from __future__ import annotations

import os
import sys

THREAD_TIMEOUT = "4"


def prefer_sleeping_blas_threads() -> bool:
    """Sets ``OPENBLAS_THREAD_TIMEOUT`` unless the user did or numpy is loaded already;
    returns whether OpenBLAS will see moecore's value."""
    if "numpy" in sys.modules:
        return os.environ.get("OPENBLAS_THREAD_TIMEOUT") == THREAD_TIMEOUT
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)
    return os.environ["OPENBLAS_THREAD_TIMEOUT"] == THREAD_TIMEOUT


prefer_sleeping_blas_threads()
