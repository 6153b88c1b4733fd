"""Shared helpers of the Python benchmarks: timing, BLAS report, optional torch, results."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The environment variables that size the thread pools of moecore's kernels (rayon), numpy's
# OpenBLAS and any OpenMP runtime. Each pool reads its variable once, when it starts (moecore's
# at its import), so a benchmark can only change them before it starts.
THREAD_VARS = ("RAYON_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Adds ``--threads T`` (see :func:`run_on_threads`) to a benchmark's arguments."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for every contender (moecore's kernels, numpy's BLAS, torch); "
        "default: all cores",
    )


def run_on_threads(threads: int | None, torch: Any = None) -> None:
    """Makes this benchmark run on ``threads`` threads (None: leave the defaults): if the
    environment says otherwise, sets it and restarts the process with the same arguments
    (once: the restarted process finds it set); ``torch``, if given, is sized at run time."""
    if threads is None:
        return
    if threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    want = {var: str(threads) for var in THREAD_VARS}
    if any(os.environ.get(var) != value for var, value in want.items()):
        os.environ.update(want)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if torch is not None:
        torch.set_num_threads(threads)


def median_interval(values: list[float]) -> tuple[float, float]:
    """A distribution-free interval holding the median with at least 95 % confidence: the
    order statistics k and n + 1 - k of the sorted values, k the largest with
    P(Binomial(n, 1/2) < k) <= 2.5 % (for n = 21: the 6th and the 16th)."""
    n = len(values)
    ordered = sorted(values)
    k, below = 0, 0.0
    while k < n:
        p_k = math.comb(n, k) / 2**n  # P(exactly k values below the median)
        if below + p_k > 0.025:
            break
        below += p_k
        k += 1
    if k == 0:  # too few rounds for 95 %: the whole range
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


def interleaved_samples(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of each call of each function, ``rounds`` per function, the functions called
    in turn within each round (after ``warmup`` untimed calls each: page faults, thread
    pools, lazy initialisation). The order rotates from round to round, so that each
    function follows every other one equally often: a library's worker threads keep
    spinning on the cores for a while after its call (torch's OpenMP pool, OpenBLAS's unless
    told not to), which slows whatever runs next; in a fixed order one contender always
    paid for it (moecore's grouped matmul, after torch's: 1.18-1.30x numpy's time, against
    0.84-0.99x with torch not in the process)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(rounds):
        shift = r % len(order) if order else 0
        for name, f in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            f()
            samples[name].append(time.perf_counter() - t0)
    return samples


def paired_times(
    fns: dict[str, Callable[[], Any]], rounds: int = 21, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Times every function once per round, in turn, for ``rounds`` rounds, so a slow phase
    of the machine hits all of them alike. The first function is the base: for each other
    one, the ratio its time / the base's time is taken per round, and the result gives the
    median of those ratios with its 95 % interval (:func:`median_interval`), next to each
    function's median time in seconds."""
    return paired_stats(interleaved_samples(fns, rounds, warmup))


def paired_stats(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """:func:`paired_times`'s result from per-round times (the first entry is the base)."""
    base = samples[next(iter(samples))]
    out = {}
    for name, times in samples.items():
        ratios = [t / b for t, b in zip(times, base)]
        low, high = median_interval(ratios)
        out[name] = {
            "median_s": statistics.median(times),
            "ratio": statistics.median(ratios),
            "ratio_low": low,
            "ratio_high": high,
        }
    return out


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


class Worker:
    """A benchmark's worker process (``python SCRIPT --worker KIND ARGV...``), spoken to line
    by line: it prints one line when ready, then one JSON line per command it reads."""

    def __init__(
        self,
        script: str,
        kind: str,
        argv: list[str],
        env: dict[str, str],
        python: str | None = None,
    ) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [python or sys.executable, script, "--worker", kind, *argv],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"{kind} worker died while starting")

    def ask(self, cmd: str) -> dict[str, Any]:
        """Sends ``cmd``; returns the worker's JSON reply."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker died at {cmd!r}")
        return dict(json.loads(line))

    def close(self) -> None:
        """Tells the worker to quit and waits for it."""
        if self.proc.stdin:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


LEVELS = ("avx512", "avx2", "baseline")
# Set in the per-level runs of `rerun_per_level`, so they measure their one level.
_ONE_LEVEL = "MOECORE_BENCH_ONE_LEVEL"


def add_cpu_levels_option(parser: argparse.ArgumentParser) -> None:
    """``--cpu-levels``: the kernel paths to measure side by side (see :func:`cpu_levels`)."""
    parser.add_argument(
        "--cpu-levels",
        default=None,
        help="comma-separated kernel paths, e.g. avx2,baseline (default: the CPU's own, "
        "and avx2 beside it on an AVX-512 CPU)",
    )


def cpu_levels(requested: str | None = None) -> list[str]:
    """The kernel paths a benchmark measures (``MOECORE_CPU_LEVEL`` values): ``requested``
    (comma-separated) or by default the CPU's own path and, on an AVX-512 CPU, the AVX2 path
    beside it, the one users of Zen 3 and of older Intel CPUs run. The cap does not reach the
    `gemm` crate (README, "which CPU path"): GEMM-bound rows keep the CPU's widest GEMM."""
    if requested:
        levels = [x.strip() for x in requested.split(",") if x.strip()]
        bad = [x for x in levels if x not in LEVELS]
        if bad or not levels:
            raise SystemExit(f"--cpu-levels: unknown level(s) {bad}; use {', '.join(LEVELS)}")
        return levels
    from moecore import build_info

    native = str(build_info()["cpu_level_native"])
    return ["avx512", "avx2"] if native == "avx512" else [native]


def level_env(env: dict[str, str], level: str) -> dict[str, str]:
    """``env`` with moecore's kernels capped at ``level``."""
    return {**env, "MOECORE_CPU_LEVEL": level}


def rerun_per_level(levels: list[str]) -> bool:
    """For benchmarks that time moecore in their own process: with more than one level (and
    not already one level's run), runs this script again once per level, under
    ``MOECORE_CPU_LEVEL``, each printing its tables under a heading, and returns True (the
    caller is done); otherwise returns False and the caller measures here."""
    if len(levels) < 2 or os.environ.get(_ONE_LEVEL):
        return False
    for level in levels:
        print(f"\n===== moecore kernels at MOECORE_CPU_LEVEL={level} =====", flush=True)
        env = {**level_env(dict(os.environ), level), _ONE_LEVEL: "1"}
        done = subprocess.run([sys.executable, *sys.argv], env=env, check=False)
        if done.returncode:
            raise SystemExit(f"the run at level {level} failed (exit {done.returncode})")
    return True


def results_path(name: str) -> Path:
    """``benches/results/<name>.json``, or ``<name>_<level>.json`` in one level's run of
    :func:`rerun_per_level` (so the levels do not overwrite each other); the folder exists."""
    level = os.environ.get("MOECORE_CPU_LEVEL") if os.environ.get(_ONE_LEVEL) else None
    out = Path(__file__).resolve().parent.parent / "results"
    out.mkdir(exist_ok=True)
    return out / (f"{name}_{level}.json" if level else f"{name}.json")


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Writes :func:`results_path` ``(name)``."""
    path = results_path(name)
    path.write_text(json.dumps(payload, indent=1))
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text table."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def torch_python(python: str | None) -> str | None:
    """The interpreter that runs the PyTorch workers: ``python`` (``--torch-python=PATH``: a
    venv with torch, e.g. ``/work/venv-torch/bin/python``, so torch is imported only in its
    workers) if it can import torch, else this interpreter if it can, else None (the caller
    skips the torch contenders). Workers inherit ``PYTHONPATH``, so they find this moecore.
    """
    if python:
        probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise SystemExit(f"--torch-python={python} cannot import torch:\n{probe.stderr}")
        return python
    return sys.executable if importlib.util.find_spec("torch") is not None else None
