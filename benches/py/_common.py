"""Shared helpers of the Python benchmarks: timing, BLAS report, optional torch, results."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def median_time(fn: Callable[[], Any], repeat: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def blas_info() -> str:
    """Which BLAS numpy uses (threadpoolctl), and whether the halving variables are set."""
    try:
        from threadpoolctl import threadpool_info

        libs = [
            f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, {i.get('num_threads')} threads)"
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        ]
        text = "; ".join(libs) or "no BLAS found by threadpoolctl"
    except ImportError:
        text = "threadpoolctl not installed"
    flags = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    return text + (f" — WARNING: {', '.join(flags)} set (halves numpy GEMM)" if flags else "")


def try_torch() -> Any:
    """``torch`` if importable, else None (benchmarks then skip the torch columns)."""
    try:
        import torch

        return torch
    except ImportError:
        return None


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Writes ``benches/results/<name>.json``."""
    out = Path(__file__).resolve().parent.parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text table."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
