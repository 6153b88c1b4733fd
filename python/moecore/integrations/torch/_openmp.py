"""torch's OpenMP workers and moecore's threads on one machine.

After each parallel region, the OpenMP runtime torch's wheels ship (GNU libgomp) keeps its idle
workers spinning (``GOMP_SPINCOUNT``, 300 000 rounds by default) before they sleep, as
OpenBLAS's do (:mod:`moecore._blas_env`): moecore's kernels (rayon) running right after a torch
op then share the cores with spinning threads (the MoE layer measured 111.5 ms alone and
156–170 ms with torch ops in between, issue 32). ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep
at once. libgomp reads it once, when it loads with torch, and has no call to change it later,
so :func:`prefer_passive_openmp` sets it only while torch is not loaded yet, and never over a
value the user chose; ``MOECORE_OMP_PASSIVE=0`` leaves it alone. Importing
:mod:`moecore.integrations.torch` before torch is what applies it; a process that imported
torch first can export ``OMP_WAIT_POLICY=PASSIVE`` itself (docs/embedding.md).
"""

from __future__ import annotations

import os
import sys

OPT_OUT_ENV = "MOECORE_OMP_PASSIVE"


def prefer_passive_openmp() -> bool:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` if torch is not loaded yet, the user set no wait
    policy and did not opt out; returns whether torch's OpenMP runs with the passive policy."""
    if os.environ.get(OPT_OUT_ENV, "1").strip() != "0" and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
