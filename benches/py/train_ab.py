"""Training speed of two moecore trees (or two presets) side by side: before/after a change.

Two trainer processes (the worker of ``train_vs_torch.py``), each importing moecore from its
own ``python/`` folder, are stepped in lock-step: step i of A, then step i of B (the order
alternating from step to step), so a slow phase of the shared machine hits both alike.
Reported: each side's median tokens/s over the steps after ``--skip`` and the median of the
per-step ratios B/A with its 95 % interval.

Run (the baseline a checkout of the code before the change, its extension built or copied):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/train_ab.py \\
        --baseline /work/base/python --steps 40
Compare two presets of one tree: ``--preset moe-small --candidate-preset moe-32``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import blas_info, median_interval
from train_vs_torch import Worker

HERE = Path(__file__).resolve().parents[2] / "python"


def start(tree: Path, preset: str, sets: list[str], threads: int) -> Worker:
    """A trainer worker importing moecore from ``tree``."""
    argv = ["--preset", preset]
    for pair in sets:
        argv += ["--set", pair]
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    try:
        return Worker("moecore", argv, threads)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved


def tokens_per_step(preset: str, sets: list[str]) -> int:
    """batch · grad_accum · seq_len of a configuration (read with this tree's moecore)."""
    from moecore.train.config import build_config, parse_overrides

    cfg = build_config(preset, None, parse_overrides(sets))
    return cfg.batch_size * cfg.grad_accum * cfg.seq_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="python/ folder of the tree to compare to")
    ap.add_argument("--candidate", default=str(HERE), help="python/ folder (this tree's)")
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument("--candidate-preset", help="the candidate's preset (default: --preset)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="both sides")
    ap.add_argument("--candidate-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out (warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    cand_preset = args.candidate_preset or args.preset
    cand_sets = [*args.set, *args.candidate_set]
    sys.path.insert(0, args.candidate)
    tokens = {
        "baseline": tokens_per_step(args.preset, args.set),
        "candidate": tokens_per_step(cand_preset, cand_sets),
    }
    print(f"BLAS: {blas_info()}")
    print(f"baseline  {args.baseline} ({args.preset} {' '.join(args.set)})")
    print(f"candidate {args.candidate} ({cand_preset} {' '.join(cand_sets)})")
    workers = {
        "baseline": start(Path(args.baseline), args.preset, args.set, args.threads),
        "candidate": start(Path(args.candidate), cand_preset, cand_sets, args.threads),
    }
    seconds: dict[str, list[float]] = {name: [] for name in workers}
    losses: dict[str, list[float]] = {name: [] for name in workers}
    try:
        for i in range(args.steps):
            order = list(workers) if i % 2 == 0 else list(reversed(workers))
            for name in order:
                reply = workers[name].ask("step")
                seconds[name].append(reply["seconds"])
                losses[name].append(reply["loss"])
    finally:
        for w in workers.values():
            w.close()
    kept = {name: s[args.skip :] for name, s in seconds.items()}
    rate = {name: [tokens[name] / t for t in s] for name, s in kept.items()}
    ratios = [c / b for c, b in zip(rate["candidate"], rate["baseline"])]
    low, high = median_interval(ratios)
    for name in workers:
        print(
            f"{name:<9} {statistics.median(rate[name]):>9,.0f} tokens/s (median of steps "
            f"{args.skip + 1}-{args.steps}), loss at step {args.steps}: {losses[name][-1]:.4f}"
        )
    print(
        f"candidate / baseline tokens/s: {statistics.median(ratios):.3f} "
        f"(95 % interval {low:.3f}-{high:.3f}, {len(ratios)} paired steps)"
    )


if __name__ == "__main__":
    main()
