"""What this installation of moecore has to work with: build, CPU, numpy, GPU, MPI.

Library code for ``moecore info``; every probe is guarded so a broken optional dependency is
reported, never raised.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from collections.abc import Callable
from typing import Any

import numpy as np

from moecore._core import build_info

# MOECORE_CPU_LEVEL caps moecore's own kernels; the `gemm` crate behind the MoE FFN, router
# and attention products detects the CPU itself (no hook to cap it without patching it).
GEMM_NOTE = "the gemm crate's GEMM still uses the CPU's widest"


def format_kernel_level(level: dict[str, str]) -> str:
    """One line for ``moecore info``: the level in force, where it came from, and what it
    does not govern."""
    return f"{level['level']} ({level['source']}; {level['note']})"


def _cuda_version(v: int) -> str:
    """CUDA's integer version (12040) as text ("12.4")."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def _probe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # each probe fails on its own: report, never raise
        return f"unavailable ({exc})"


def _gpu_name(cupy: Any, index: int) -> str:
    return str(cupy.cuda.runtime.getDeviceProperties(index)["name"].decode())


def _cupy_status() -> dict[str, Any]:
    if importlib.util.find_spec("cupy") is None:
        return {"available": False, "reason": "cupy is not installed (pip install moecore[gpu])"}
    try:
        import cupy  # optional: imported only to probe
    except Exception as exc:
        return {"available": False, "reason": f"cupy is installed but fails to import: {exc}"}
    out: dict[str, Any] = {"version": cupy.__version__}
    out["nvrtc"] = _probe(lambda: ".".join(map(str, cupy.cuda.nvrtc.getVersion())))
    out["cuda_runtime"] = _probe(lambda: _cuda_version(cupy.cuda.runtime.runtimeGetVersion()))
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # a CuPy without a driver raises CUDARuntimeError and friends
        out.update(available=False, reason=f"cupy is installed but no GPU: {exc}")
        return out
    out["available"] = count > 0
    out["devices"] = count
    out["driver"] = _probe(lambda: _cuda_version(cupy.cuda.runtime.driverGetVersion()))
    out["gpus"] = [_probe(functools.partial(_gpu_name, cupy, i)) for i in range(count)]
    return out


def _mpi_status() -> dict[str, Any]:
    if importlib.util.find_spec("mpi4py") is None:
        return {"available": False, "reason": "mpi4py is not installed (pip install moecore[mpi])"}
    try:
        import mpi4py  # optional: imported only to probe

        mpi4py.rc.initialize = False  # probing must not start an MPI job
        from mpi4py import MPI

        library = MPI.Get_library_version().strip().splitlines()[0]
    except Exception as exc:  # a missing libmpi surfaces as ImportError/RuntimeError
        return {"available": False, "reason": f"mpi4py is installed but MPI is not: {exc}"}
    return {"available": True, "mpi4py": mpi4py.__version__, "library": library}


def collect() -> dict[str, Any]:
    """Returns everything ``moecore info`` prints, as a plain dict."""
    build = build_info()
    return {
        "moecore": build["version"],
        "build_profile": build["profile"],
        "target": f"{build['target_arch']}-{build['target_os']}",
        "cpu_features": list(build["cpu_features"]),
        "kernel_level": {
            "level": build["cpu_level"],
            "native": build["cpu_level_native"],
            "source": build["cpu_level_source"],
            "note": GEMM_NOTE,
        },
        "cpu_count": os.cpu_count(),
        "rayon_threads": build["rayon_threads"],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": _cupy_status(),
        "mpi": _mpi_status(),
    }
