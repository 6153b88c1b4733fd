"""Pipeline parallelism's memory on this machine: per-rank bytes of parameters, gradients and
AdamW state against the formula of each rank's stages, and peak RSS per rank.

Run (the ``mpi`` extra installed)::

    python benches/py/pipeline_memory.py [--preset moe-small] [--steps 2]

It runs ``moecore train --preset P`` once in one process and then under
``mpiexec -n p … --pp p --schedule S`` for each (p, S) of ``--runs`` (one BLAS thread per
rank; ``--batch``/``--seq`` make the global batch small so that a run stays short on 2 cores
— the bytes do not depend on it), and reads the last step's per-rank figures from
``metrics.jsonl`` (rank r of the world is pipeline rank r when dp = ep = 1).

The formula (fp32 parameters, AdamW's two moments): pipeline rank r holds Ψ_r parameters,

    Ψ_r = Σ_{blocks b of r's stages} Ψ_b + [r holds the first or the last stage]·V·d
          + [r holds the first stage]·T·d + [r holds the last stage]·Ψ_norm

(the token embedding V·d is tied to the output layer, so it lives on both ends; the learned
positions T·d with the first stage, the final norm with the last), and keeps params 4Ψ_r,
grads 4Ψ_r, optimizer 8Ψ_r bytes. Ψ_b is each block's count in one process's model; which
stages a rank holds is the schedule's placement (1F1B: stage r; interleaved: stages
c·p + r; DualPipe: stages r and p − 1 − r). Peak RSS is the process's high-water mark: it
includes the interpreter and libraries, the activations, and — at start-up, where every
rank builds the whole model from the seed before dropping the others' stages — 4Ψ once.
Results: ``benches/results/pipeline_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results

KEYS = ("rank_param_bytes", "rank_grad_bytes", "rank_optimizer_bytes")


def run(p: int, kind: str, args: argparse.Namespace, out: Path) -> dict:
    """The last metrics record of a run on ``p`` pipeline ranks (p = 1: one process)."""
    cmd = [sys.executable, "-m", "moecore.cli", "train", "--preset", args.preset]
    if p > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(p), *cmd]
        cmd += ["--pp", str(p), "--schedule", kind]
    cmd += ["--out", str(out), "--set", f"steps={args.steps}", "eval_every=0"]
    cmd += ["checkpoint_every=0", f"batch_size={args.batch}", f"seq_len={args.seq}"]
    cmd += [f"grad_accum={2 * p if p > 1 else 4}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def formula(model, kind: str, p: int) -> list[int]:
    """Ψ_r of every pipeline rank (the module docstring's formula)."""
    from moecore.distributed.pipeline import schedule
    from moecore.train.pipeline import balance_stages

    s = schedule(kind, p, 2 * p, virtual_stages=2)
    bounds = balance_stages([1.0] * len(model.blocks), s.stages)
    per_block = [sum(q.numel() for q in b.parameters()) for b in model.blocks]
    vd = model.tok_emb.weight.numel()
    td = model.pos_emb.numel() if hasattr(model, "pos_emb") else 0
    norm = sum(q.numel() for q in model.norm.parameters())
    out = []
    for r in range(p):
        stages = set(s.placement[r])
        first, last = 0 in stages, s.stages - 1 in stages
        psi = sum(sum(per_block[lo:hi]) for st, (lo, hi) in enumerate(bounds) if st in stages)
        out.append(psi + (first or last) * vd + first * td + last * norm)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument(
        "--runs", nargs="+", default=["2:1f1b", "2:interleaved", "4:1f1b", "4:dualpipe"]
    )
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=64, help="sequence length")
    args = ap.parse_args()
    from moecore.train import build_config
    from moecore.train.trainer import build_model

    model = build_model(build_config(args.preset, overrides={"seq_len": args.seq}))
    total = sum(q.numel() for q in model.parameters())
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        plans = [(1, "-")] + [(int(a), b) for a, b in (r.split(":") for r in args.runs)]
        for p, kind in plans:
            rec = run(p, kind, args, Path(tmp) / f"p{p}-{kind}")
            psi = [total] if p == 1 else formula(model, kind, p)
            want = {k: [f * m for m in psi] for k, f in zip(KEYS, (4, 4, 8))}
            worst = max(abs(rec[k][r] - want[k][r]) / want[k][r] for k in KEYS for r in range(p))
            for r in range(p):
                state = sum(rec[k][r] for k in KEYS)
                rows.append(
                    [p, kind, r]
                    + [f"{rec[k][r] / 2**20:.2f} ({want[k][r] / 2**20:.2f})" for k in KEYS]
                    + [f"{state / 2**20:.1f}", f"{rec['rank_peak_rss_mb'][r]:.0f}"]
                )
            results.append(
                {
                    "pp": p,
                    "schedule": kind,
                    "measured": {k: rec[k] for k in KEYS},
                    "formula": want,
                    "worst_relative_to_formula": worst,
                    "peak_rss_mb": rec["rank_peak_rss_mb"],
                }
            )
            print(f"pp={p} {kind}: worst relative to the formula {worst:.1e}", flush=True)
    header = ["pp", "schedule", "rank", "params MiB (formula)", "grads MiB", "optimizer MiB"]
    header += ["state MiB", "peak RSS MiB"]
    print(f"{args.preset}: Ψ = {total:,} parameters")
    print(table(rows, header))
    payload = {"preset": args.preset, "psi": total, "args": vars(args), "results": results}
    print(f"results: {write_results('pipeline_memory', payload)}")


if __name__ == "__main__":
    main()
