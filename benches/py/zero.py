"""ZeRO on this machine (loopback MPI): per-rank bytes of parameters, gradients and AdamW
state for each stage against the formula, peak RSS per rank, and step time against plain
data parallelism on the same ranks.

Run (release build and the ``mpi`` extra installed)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/zero.py [--ranks 2 4]

For each P in ``--ranks`` and each stage 0 (plain data parallelism) … 3, it runs
``mpiexec -n P moecore train --preset moe-small --dp P --zero S`` for ``--steps`` steps
(one BLAS thread per rank; ``--batch``/``--seq`` set the global batch, smaller than the
preset's by default so that a round stays short on 2 cores — the bytes do not depend on
it), in ``--rounds`` rounds that take the stages in turn, so load from other work spreads
over them. It reads every step's per-rank figures from ``metrics.jsonl``.

The formula (fp32 parameters, AdamW's two moments; Ψ parameters, P ranks; every bucket
cut into P parts of ⌈n/P⌉ elements, so "/P" is exact up to a few elements per bucket):

    stage 0: params 4Ψ,   grads 4Ψ,   optimizer 8Ψ
    stage 1: params 4Ψ,   grads 4Ψ,   optimizer 8Ψ/P
    stage 2: params 4Ψ,   grads 4Ψ/P, optimizer 8Ψ/P
    stage 3: params 4Ψ/P, grads 4Ψ/P, optimizer 8Ψ/P

Step time (the trainer's own timing of the step) is the median of the steps after the
first two (warm-up) over all rounds.
Results go to ``benches/results/zero.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import blas_info, table, write_results

STAGES = (0, 1, 2, 3)
KEYS = ("rank_param_bytes", "rank_grad_bytes", "rank_optimizer_bytes")


def formula(psi: int, p: int, stage: int) -> dict[str, float]:
    """Bytes per rank the table in the module docstring gives."""
    return {
        "rank_param_bytes": 4 * psi / (p if stage >= 3 else 1),
        "rank_grad_bytes": 4 * psi / (p if stage >= 2 else 1),
        "rank_optimizer_bytes": 8 * psi / (p if stage >= 1 else 1),
    }


def run(p: int, stage: int, args: argparse.Namespace, out: Path) -> list[dict]:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(p), sys.executable, "-m", "moecore.cli", "train"]
    cmd += ["--preset", args.preset, "--out", str(out), "--dp", str(p), "--zero", str(stage)]
    cmd += ["--set", f"steps={args.steps}", "eval_every=0", "checkpoint_every=0"]
    cmd += [f"batch_size={args.batch}", f"seq_len={args.seq}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    cfg = json.loads((out / "config.json").read_text())
    tokens = cfg["batch_size"] * cfg["grad_accum"] * cfg["seq_len"]
    records = [json.loads(line) for line in lines]
    for rec in records:  # the step alone (the trainer's tokens_per_s times only the step)
        rec["step_seconds"] = tokens / rec["tokens_per_s"]
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=128, help="sequence length")
    args = ap.parse_args()
    from moecore.train import build_config
    from moecore.train.trainer import build_model

    sizes = {"batch_size": args.batch, "seq_len": args.seq}  # seq_len sizes pos_emb
    model = build_model(build_config(args.preset, overrides=sizes))
    psi = sum(p.numel() for p in model.parameters() if p.requires_grad)  # what ZeRO shards
    times: dict[tuple[int, int], list[float]] = {}
    last: dict[tuple[int, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for p in args.ranks:
                for stage in STAGES:
                    records = run(p, stage, args, Path(tmp) / f"p{p}-z{stage}-r{r}")
                    steps = [rec["step_seconds"] for rec in records[2:]]  # after warm-up
                    times.setdefault((p, stage), []).extend(steps)
                    last[(p, stage)] = records[-1]
    rows, results = [], []
    for p in args.ranks:
        plain = statistics.median(times[(p, 0)])
        for stage in STAGES:
            rec, want = last[(p, stage)], formula(psi, p, stage)
            measured = {k: rec[k] for k in KEYS}
            worst = max(abs(max(measured[k]) - want[k]) / want[k] for k in KEYS)
            step = statistics.median(times[(p, stage)])
            rows.append(
                [p, stage]
                + [f"{max(measured[k]) / 2**20:.2f} ({want[k] / 2**20:.2f})" for k in KEYS]
                + [f"{worst:.1e}", f"{max(rec['rank_peak_rss_mb']):.0f}"]
                + [f"{step * 1e3:.0f}", f"{step / plain:.2f}"]
            )
            results.append(
                {
                    "ranks": p,
                    "stage": stage,
                    "measured": measured,
                    "formula": want,
                    "worst_relative_to_formula": worst,
                    "peak_rss_mb": rec["rank_peak_rss_mb"],
                    "step_seconds_median": step,
                    "step_seconds": times[(p, stage)],
                    "relative_to_plain": step / plain,
                }
            )
    header = ["P", "stage", "params MiB (formula)", "grads MiB", "optimizer MiB"]
    header += ["worst vs formula", "peak RSS MiB", "step ms", "vs plain"]
    print(f"{args.preset}: Ψ = {psi:,} parameters; {blas_info()}")
    print(table(rows, header))
    path = write_results(
        "zero",
        {"preset": args.preset, "psi": psi, "args": vars(args), "results": results},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
