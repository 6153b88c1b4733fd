"""Environment for numpy's OpenBLAS, set before numpy loads (read once, at its load).

After every BLAS call OpenBLAS keeps its idle worker threads spinning for 2^28 cycles
(about 0.1 s) before they sleep. moecore's Rust kernels (rayon) usually run right after a
numpy matmul, and those spinning threads take the cores from them: measured side by side,
the grouped expert matmul ran at 75 GFLOP/s after numpy calls against 147 GFLOP/s with the
workers sleeping at once (``benches/py/moe_kernels.py``). ``OPENBLAS_THREAD_TIMEOUT=4``
(2^4 cycles, OpenBLAS's minimum) makes them sleep at once; a value the user set is kept.

OpenBLAS reads the variable when it loads, so it is too late once numpy came first (the
order most code has: the MoE layer then ran 1.4–1.6× slower, ``benches/py/blas_import_order.py``).
Then :func:`restart_blas_threads` hands the value to each OpenBLAS already loaded: it makes
the library read its environment again (``openblas_read_env``) and stops its thread pool
(``blas_thread_shutdown_``, what OpenBLAS itself does around ``fork``); the next BLAS call
starts the pool again, same size, with the short timeout. Both are exported, undocumented
symbols (checked in the scipy-openblas 0.3.31 that numpy 2.4 ships): a library without them is
left alone; so is every library while another Python thread runs (it might be inside a BLAS call).
``MOECORE_BLAS_RESTART=0`` turns this off. The process environment is left as it was.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

THREAD_TIMEOUT = "4"


def prefer_sleeping_blas_threads() -> bool:
    """Sets ``OPENBLAS_THREAD_TIMEOUT`` unless the user did or numpy is loaded already;
    returns whether OpenBLAS will see moecore's value."""
    if "numpy" in sys.modules:
        return os.environ.get("OPENBLAS_THREAD_TIMEOUT") == THREAD_TIMEOUT
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", THREAD_TIMEOUT)
    return os.environ["OPENBLAS_THREAD_TIMEOUT"] == THREAD_TIMEOUT


RESTART_ENV = "MOECORE_BLAS_RESTART"


def loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if "openblas" in os.path.basename(p).lower() and ".so" in p)


def restart_blas_threads() -> list[str]:
    """Gives each loaded OpenBLAS the short thread timeout by re-reading its environment and
    restarting its thread pool (see the module docstring); returns the libraries restarted.

    Stopping the pool under a BLAS call running in another thread would lose that call's
    work, so nothing is done while another Python thread is alive; nor when the user set
    ``OPENBLAS_THREAD_TIMEOUT`` or ``MOECORE_BLAS_RESTART=0``.
    """
    if os.environ.get(RESTART_ENV, "1").strip() == "0" or "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return []
    if threading.active_count() > 1:
        return []
    restarted = []
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = THREAD_TIMEOUT
    try:
        for path in loaded_openblas():
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same handle, no new copy
                read_env, shutdown = lib.openblas_read_env, lib.blas_thread_shutdown_
            except (OSError, AttributeError):
                continue  # not an OpenBLAS that exports them: leave it alone
            read_env()
            shutdown()
            restarted.append(path)
    finally:
        del os.environ["OPENBLAS_THREAD_TIMEOUT"]
    return restarted


prefer_sleeping_blas_threads()
# numpy (or scipy) came first: its OpenBLAS has read its environment already.
RESTARTED = restart_blas_threads() if "numpy" in sys.modules else []
