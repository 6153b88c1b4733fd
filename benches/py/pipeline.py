"""Pipeline schedules on this machine: measured bubble beside theory, peak memory per stage,
and the Rust simulator's predicted step time beside the measured one.

Run (the ``mpi`` extra installed)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/pipeline.py [--steps 3]

For p = 2 and 4 pipeline ranks and m = 4, 8, 16 micro-batches it launches
``mpiexec -n p`` once per schedule (GPipe, 1F1B, interleaved with v = 2, DualPipe where
m ≥ 2p) on an 8-layer MoE transformer (d_model 128, 4 experts, batch 4 × 64 tokens per
micro-batch), cut uniformly into stages, with one BLAS thread per rank. Each rank runs
``--steps`` timed steps after one warm-up step through
:class:`moecore.distributed.pipeline.PipelineEngine`, recording every forward and backward's
duration. Reported per (p, m, schedule):

- measured bubble: ``1 − Σ busy / (p · step)`` with ``step`` the slowest rank's step time
  (median over steps) — beside the theory: (p−1)/(m+p−1) GPipe and 1F1B, (p−1)/(v·m+p−1)
  interleaved, and for DualPipe the report's (p/2−1)(F&B+B−3W) idle time (here W = 0,
  F&B = F + B) over the step;
- peak memory per stage: the largest ``tracemalloc`` peak of a rank during one extra
  (untimed) step, and the most micro-batch chunks alive at once (1F1B: ≤ p);
- predicted: :func:`moecore.distributed.pipeline.simulate` on the measured per-stage median
  forward and backward times and a measured point-to-point time per message, and its
  error against the measured step.

With p = 4 on a 2-core machine the ranks share cores: compute times inflate and vary with
what runs beside them, which the simulator (one core per rank) does not model; the p = 2
rows are the meaningful ones there. Results: ``benches/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import table, write_results

ROWS, SEQ, D = 4, 64, 128


def _worker(kind: str, m: int, steps: int) -> None:
    """One pipeline rank under mpiexec; rank 0 prints one JSON line."""
    import moecore.distributed as dist
    from moecore.distributed.pipeline import PipelineEngine, schedule
    from moecore.models import ModelConfig, MoETransformer
    from moecore.train.pipeline import balance_stages

    g = dist.init()
    p = g.size
    cfg = ModelConfig(
        vocab_size=256, d_model=D, n_layers=8, n_heads=4, seq_len=SEQ, n_experts=4, d_ff=128
    )
    model = MoETransformer(cfg)
    s = schedule(kind, p, m, virtual_stages=2)
    bounds = balance_stages([1.0] * cfg.n_layers, s.stages)
    rng = np.random.default_rng(0)
    batches = [
        (rng.integers(0, 256, (ROWS, SEQ)), rng.integers(0, 256, (ROWS, SEQ))) for _ in range(m)
    ]

    class Runner:
        def forward(self, stage: int, mb: int, x: Any) -> Any:
            ids, targets = batches[mb]
            lo, hi = bounds[stage]
            h = model.embed(ids) if stage == 0 else x
            h = model.run_blocks(h, lo, hi)
            return model.head(h, targets) if stage == s.stages - 1 else h

    engine = PipelineEngine(s, g, Runner(), (ROWS, SEQ, D))
    # Point-to-point time of one activation message (ping-pong between ranks 0 and 1).
    buf = np.zeros((ROWS, SEQ, D), np.float32)
    pings = []
    for _ in range(20):
        g.barrier()
        t0 = time.perf_counter()
        if g.rank == 0:
            g.isend(buf, 1, 7).wait()
            g.irecv(buf, 1, 8).wait()
        elif g.rank == 1:
            g.irecv(buf, 0, 7).wait()
            g.isend(buf, 0, 8).wait()
        pings.append((time.perf_counter() - t0) / 2)
    message_s = float(np.median(pings))
    step_s, busy, computes = [], [], []
    for i in range(steps + 1):
        g.barrier()
        engine.run(1.0 / m)
        model.zero_grad()
        if i:
            step_s.append(engine.step_s)
            busy.append(sum(t for _, _, t in engine.computes))
            computes.extend(engine.computes)
    g.barrier()
    tracemalloc.start()
    engine.run(1.0 / m)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mine = {
        "step_s": step_s,
        "busy_s": busy,
        "computes": computes,
        "peak_bytes": peak_bytes,
        "peak_alive": engine.peak_alive,
        "stages": list(s.placement[g.rank]),
    }
    everyone = g.comm.gather(mine, root=0)  # type: ignore[attr-defined]
    if g.rank:
        return
    steps_max = [max(r["step_s"][i] for r in everyone) for i in range(steps)]
    step = float(np.median(steps_max))
    busy_total = sum(float(np.median(r["busy_s"])) for r in everyone)
    fwd = [[] for _ in range(s.stages)]  # type: list[list[float]]
    bwd = [[] for _ in range(s.stages)]  # type: list[list[float]]
    for r in everyone:
        for pass_, stage, t in r["computes"]:
            (fwd if pass_ == "forward" else bwd)[stage].append(t)
    f_s = [float(np.median(t)) for t in fwd]
    b_s = [float(np.median(t)) for t in bwd]
    from moecore.distributed.pipeline import simulate

    sim = simulate(kind, p, m, f_s, b_s, virtual_stages=2, transfer_s=message_s)
    print(
        "RESULT "
        + json.dumps(
            {
                "p": p,
                "m": m,
                "schedule": kind,
                "step_s": step,
                "bubble": 1.0 - busy_total / (p * step),
                "predicted_s": sim["step_s"],
                "predicted_bubble": sim["bubble"],
                "message_s": message_s,
                "peak_bytes": [r["peak_bytes"] for r in everyone],
                "peak_alive": [r["peak_alive"] for r in everyone],
                "forward_s": f_s,
                "backward_s": b_s,
            }
        ),
        flush=True,
    )


def _theory(kind: str, p: int, m: int, f: float, b: float) -> float:
    if kind in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if kind == "interleaved":
        return (p - 1) / (2 * m + p - 1)
    idle = (p / 2 - 1) * (f + 2 * b)
    return idle / (m * (f + b) + idle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--micro-batches", default="4,8,16")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "M"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), args.steps)
        return
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    results, rows = [], []
    for p in map(int, args.ranks.split(",")):
        for m in map(int, args.micro_batches.split(",")):
            for kind in ("gpipe", "1f1b", "interleaved", "dualpipe"):
                if (kind == "dualpipe" and m < 2 * p) or (kind == "interleaved" and m % p):
                    continue
                cmd = [mpiexec, "-n", str(p), sys.executable, "-m", "mpi4py", __file__]
                cmd += ["--steps", str(args.steps), "--worker", kind, str(m)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    raise SystemExit(f"{kind} p={p} m={m} failed:\n{out.stdout}\n{out.stderr}")
                r = json.loads(line[0][7:])
                f = sum(r["forward_s"]) / len(r["forward_s"])
                b = sum(r["backward_s"]) / len(r["backward_s"])
                r["theory_bubble"] = _theory(kind, p, m, f, b)
                r["predicted_error"] = r["predicted_s"] / r["step_s"] - 1.0
                results.append(r)
                rows.append(
                    [
                        p,
                        m,
                        kind,
                        f"{r['step_s'] * 1e3:.0f}",
                        f"{r['bubble']:.3f}",
                        f"{r['theory_bubble']:.3f}",
                        f"{r['predicted_s'] * 1e3:.0f}",
                        f"{r['predicted_error']:+.1%}",
                        "/".join(f"{x / 2**20:.0f}" for x in r["peak_bytes"]),
                        "/".join(map(str, r["peak_alive"])),
                    ]
                )
                print(table(rows[-1:], HEADER).splitlines()[-1], flush=True)
    print(table(rows, HEADER))
    print(f"results: {write_results('pipeline', {'runs': results})}")


HEADER = [
    "p",
    "m",
    "schedule",
    "step ms",
    "bubble",
    "theory",
    "sim ms",
    "sim err",
    "peak MiB/rank",
    "alive/rank",
]

if __name__ == "__main__":
    main()
