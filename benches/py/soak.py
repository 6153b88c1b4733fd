"""Soak: does a long run's memory stay flat? And how close is the pre-flight estimate?

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/soak.py [--steps 3000]
      env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/soak.py --estimate

Default: trains moe-tiny (built-in corpus, evaluation and a checkpoint every 500 steps, as a
real run does) for ``--steps`` steps and reads ``rss_mb`` from its ``metrics.jsonl``. After a
warm-up (the first 10 % of the steps: allocator arenas and caches fill), a leak shows as a
slope: the least-squares RSS trend over the remaining steps, in MiB per 1000 steps, and the
rise from the first to the last 100 steps. "flat" means the trend projects to < 1 MiB per
1000 steps and the rise is < 2 MiB.

``--estimate``: for moe-tiny and moe-small, trains a few steps in a fresh process each and
compares the peak RSS (``getrusage``) with :func:`moecore.train.preflight.estimate`.
Results go to benches/results/soak.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results" / "soak.json"


def soak(steps: int) -> dict[str, object]:
    """Trains moe-tiny for ``steps`` steps and summarises its RSS trend."""
    from moecore.train import Trainer, build_config
    from moecore.train.metrics import read_metrics

    every = max(steps // 6, 1)
    config = build_config(
        "moe-tiny",
        overrides={
            "steps": steps,
            "decay_steps": steps,
            "eval_every": every,
            "checkpoint_every": every,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        Trainer(config, Path(tmp) / "run", out=io.StringIO()).train()
        seconds = time.perf_counter() - t0
        records = [r for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if "rss_mb" in r]
    rss = np.array([r["rss_mb"] for r in records])
    start = max(len(rss) // 10, 1)
    x = np.arange(start, len(rss))
    slope = float(np.polyfit(x, rss[start:], 1)[0]) * 1000 if len(x) > 1 else 0.0
    head, tail = float(np.mean(rss[start : start + 100])), float(np.mean(rss[-100:]))
    return {
        "steps": steps,
        "seconds": round(seconds, 1),
        "rss_mb_after_warmup": round(float(rss[start]), 1),
        "rss_mb_last": round(float(rss[-1]), 1),
        "rss_mb_min_max_after_warmup": [float(rss[start:].min()), float(rss[start:].max())],
        "peak_rss_mb": records[-1]["peak_rss_mb"],
        "trend_mb_per_1000_steps": round(slope, 3),
        "rise_first_to_last_100_mb": round(tail - head, 2),
        "flat": abs(slope) < 1.0 and tail - head < 2.0,
    }


_CHILD = """
import io, resource, sys, tempfile
from moecore.train import Trainer, build_config
c = build_config(sys.argv[1], overrides={"steps": int(sys.argv[2]), "eval_every": 0,
                                          "checkpoint_every": 0})
Trainer(c, tempfile.mkdtemp(), out=io.StringIO()).train()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def compare_estimate() -> list[dict[str, object]]:
    """Peak RSS of a few steps of each preset (fresh process) against the estimate."""
    from moecore.train import build_config
    from moecore.train.preflight import estimate

    rows = []
    for preset, steps in (("moe-tiny", 20), ("moe-small", 4)):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, preset, str(steps)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        measured = float(out.split()[-1])
        est = estimate(build_config(preset)).total / 2**20
        rows.append(
            {
                "preset": preset,
                "steps": steps,
                "peak_rss_mb": round(measured, 1),
                "estimate_mb": round(est, 1),
                "estimate_over_measured": round(est / measured, 3),
            }
        )
    return rows


def main() -> None:
    """Runs the soak (or the estimate comparison) and prints/saves the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="moe-tiny steps (3000)")
    parser.add_argument("--estimate", action="store_true", help="compare the memory estimate")
    args = parser.parse_args()
    if args.steps < 10:
        raise SystemExit("--steps must be >= 10")
    result: dict[str, object] = {"cpu": platform.processor() or platform.machine()}
    if args.estimate:
        result["estimate"] = compare_estimate()
    else:
        result["soak"] = soak(args.steps)
    result["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result, indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous.update(result)
    RESULTS.write_text(json.dumps(previous, indent=1) + "\n")


if __name__ == "__main__":
    main()
