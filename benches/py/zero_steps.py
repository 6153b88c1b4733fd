"""ZeRO step times against plain data parallelism, measured and predicted by
``moecore.comm.simulate``, on loopback MPI and (``--shaped``, root) on a loopback shaped to
1 Gbit/s — the link of ``dist.py``.

Run (release build and the ``mpi`` extra installed)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/zero_steps.py [--shaped]

It launches itself under ``mpiexec -n P`` (one BLAS thread per rank) and, in each rank:
builds ``--preset`` (moe-small) once per stage 0 (plain :class:`DataParallel`, the buckets
as the trainer keeps them) … 3 (:class:`ZeRO` with :class:`ShardedOptimizer` over AdamW),
and beside each an unwrapped twin (same seed) that is only profiled. In each of ``--rounds``
rounds, for every stage in turn, it profiles the twin (forward, each gradient's ready time,
the optimizer; for stage 3 also each block's forward), then times ``--steps`` steps of the
wrapped model (2 warm-up steps first), each from a barrier to the end of the optimizer
(stages 1–2 include the all-gather of the parameters, stage 3 its gathers), then profiles
the twin again; the round's prediction is the mean of the two profiles'. The profiles are
taken in the same round as the steps they predict, on both sides of them: the speed of
this shared 2-vCPU machine drifts by 10–35 % over minutes, and a profile taken once at the
start compared a slow phase's steps with a fast phase's compute. Measured: the median over all steps of rank 0;
predicted: the median of the rounds' predictions; the error: the median of the rounds'
prediction / measured − 1.

The prediction: ``simulate`` replays the stage's own scheduler on an α–β link fitted to
blocking all-reduces of 4 KiB and 16 MiB on the same group (as ``dist.py``), with the
measured cost of copying a byte (``moecore.train.plan.copy_cost``) and, for stage 3, of
faulting back a released one (``moecore.distributed.zero.memory.refault_cost``), from each
rank's own profile; the largest of the ranks' predictions is the step's (the slowest rank sets it).
It assumes operations progress while compute runs; ``--progress thread`` runs
the wrappers with their polling thread, which does that, and ``hooks`` (the trainer's
default) progresses MPI only at gradient hooks and waits.
Results go to ``benches/results/zero_steps.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import blas_info, table, write_results
from dist import NAMESPACE, TCP_ONLY, _batch, _link, _model, mpi_launcher, run_links

STAGES = (0, 1, 2, 3)


def _unit_forward_times(model, x, y, repeat: int = 3) -> list[float]:
    """Seconds of forward of each stage-3 unit (the root first: the whole forward minus the
    blocks'), the median of ``repeat`` runs after a warm-up."""
    from moecore import nn

    blocks = [
        b for child in model._modules.values() if isinstance(child, nn.ModuleList) for b in child
    ]
    spent = [0.0] * len(blocks)

    def timed(i, original):
        def forward(*a, **k):
            t0 = time.perf_counter()
            out = original(*a, **k)
            spent[i] += time.perf_counter() - t0
            return out

        return forward

    for i, b in enumerate(blocks):
        object.__setattr__(b, "forward", timed(i, b.forward))
    runs = []
    try:
        for r in range(1 + repeat):
            spent[:] = [0.0] * len(blocks)
            t0 = time.perf_counter()
            model(x, y)
            total = time.perf_counter() - t0
            if r:
                runs.append([total - sum(spent), *spent])
    finally:
        for b in blocks:
            object.__delattr__(b, "forward")
    return [float(v) for v in np.median(np.asarray(runs), axis=0)]


def _predict(wrapper, stage: int, profile, units_fwd, link) -> float:
    from moecore.comm import CostModel, simulate
    from moecore.distributed.zero.memory import refault_cost
    from moecore.train.plan import copy_cost

    cost = CostModel(
        intra=link, inter=link, copy_s_per_byte=copy_cost(), fault_s_per_byte=refault_cost()
    )
    units = ()
    if stage == 3:
        units = [(u.params, fwd) for u, fwd in zip(wrapper.sharded.units, units_fwd)]
    return simulate(wrapper.scheduler, profile, cost, zero=stage, units=units)["step_s"]


def worker(args: argparse.Namespace) -> None:
    import moecore.distributed as dist
    from moecore import optim
    from moecore.distributed.zero import ShardedOptimizer, ZeRO
    from moecore.train.plan import profile_step

    group = dist.init()
    rows = args.global_batch // group.size
    link = _link(group)
    runs = []
    for stage in args.stages:
        model, cfg = _model(args.preset, args.seq)
        twin, _ = _model(args.preset, args.seq)  # profiled beside the steps, never wrapped
        kw = {"progress": args.progress}
        if stage == 0:
            wrapper = dist.DataParallel(model, group, gradient_as_bucket_view=True, **kw)
            opt = optim.AdamW(model.parameters(), lr=1e-4)
        else:
            wrapper = ZeRO(model, group, stage=stage, **kw)
            opt = ShardedOptimizer(optim.AdamW(model.parameters(), lr=1e-4), [wrapper])
        runs.append(
            {
                "stage": stage,
                "model": model,
                "cfg": cfg,
                "wrapper": wrapper,
                "opt": opt,
                "twin": (twin, optim.AdamW(twin.parameters(), lr=1e-4)),
                "times": [],
                "rounds": [],
            }
        )
    done = [0] * len(runs)
    for r in range(args.rounds):
        for v in [(r + j) % len(runs) for j in range(len(runs))]:
            run = runs[v]
            twin, twin_opt = run["twin"]

            def predict(run=run, twin=twin, twin_opt=twin_opt) -> tuple[float, float]:
                """(prediction, profiled compute) from a profile of the twin taken now."""
                x, y = _batch(run["cfg"], 0, rows, group.rank)
                group.barrier()
                profile = profile_step(twin, x, y, twin_opt, repeat=args.profile_repeat)
                units_fwd = (
                    _unit_forward_times(twin, x, y, args.profile_repeat)
                    if run["stage"] == 3
                    else []
                )
                mine = _predict(run["wrapper"], run["stage"], profile, units_fwd, link)
                # A synchronous step lasts as long as its slowest rank's: each rank predicts
                # from its own profile, the step is the largest prediction.
                top = float(group.allreduce(np.array([mine]), op="max")[0])
                return top, profile.forward_s + sum(profile.backward_s) + profile.optimizer_s

            before = predict()
            steps = []
            for _ in range((2 if r == 0 else 0) + args.steps):
                step, done[v] = done[v], done[v] + 1
                x, y = _batch(run["cfg"], step, rows, group.rank)
                group.barrier()
                t0 = time.perf_counter()
                loss = run["model"](x, y)
                t1 = time.perf_counter()
                loss.backward()
                run["wrapper"].finish()
                t2 = time.perf_counter()
                run["opt"].step()
                run["opt"].zero_grad()
                t3 = time.perf_counter()
                if step >= 2:
                    steps.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
            after = predict()
            run["times"] += steps
            run["rounds"].append(
                {
                    # The profiles bracket the steps: their mean cancels a drift in speed
                    # within the round.
                    "predicted_s": (before[0] + after[0]) / 2,
                    "predicted_before_after_s": [before[0], after[0]],
                    "step_s": float(np.median([t[0] for t in steps])),
                    "profile_compute_s": (before[1] + after[1]) / 2,
                }
            )
    out = []
    for run in runs:
        times, rounds = run["times"], run["rounds"]
        out.append(
            {
                "stage": run["stage"],
                "ranks": group.size,
                "step_s": float(np.median([t[0] for t in times])),
                # Medians of the parts: forward; backward with finish; optimizer step
                # (with the all-gather of stages 1-2).
                "forward_s": float(np.median([t[1] for t in times])),
                "backward_s": float(np.median([t[2] for t in times])),
                "optimizer_s": float(np.median([t[3] for t in times])),
                "steps": [t[0] for t in times],
                "rounds": rounds,
                "predicted_s": float(np.median([q["predicted_s"] for q in rounds])),
                "error": float(np.median([q["predicted_s"] / q["step_s"] - 1 for q in rounds])),
                "profile_compute_s": float(np.median([q["profile_compute_s"] for q in rounds])),
                "link_gbit": link.gbit_per_s,
                "link_latency_us": link.latency_s * 1e6,
                "buckets": len(run["wrapper"].buckets),
            }
        )
    if group.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (the preset's)")
    ap.add_argument(
        "--global-batch", type=int, default=None, help="sequences per step (the preset's)"
    )
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stage and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--profile-repeat", type=int, default=2, help="profiled steps per stage and round"
    )
    ap.add_argument("--progress", choices=("hooks", "thread"), default="hooks")
    ap.add_argument("--stages", type=int, nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--shaped", action="store_true", help="also on a 1 Gbit/s loopback (root)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seq is None or args.global_batch is None:
        from moecore.train.config import build_config

        preset = build_config(args.preset)
        args.seq = args.seq or preset.seq_len
        args.global_batch = args.global_batch or preset.batch_size
    if args.worker:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    me = [sys.executable, "-m", "mpi4py", __file__, "--worker"]
    opts = ["--preset", args.preset, "--seq", str(args.seq), "--progress", args.progress]
    opts += ["--global-batch", str(args.global_batch), "--steps", str(args.steps)]
    opts += ["--rounds", str(args.rounds), "--stages", *map(str, args.stages)]
    opts += ["--profile-repeat", str(args.profile_repeat)]
    mpiexec, family = mpi_launcher(env)
    runs = [("loopback", [mpiexec, "-n", str(p), *me, *opts]) for p in args.ranks]
    if args.shaped:
        inside = ["ip", "netns", "exec", NAMESPACE, "env", *TCP_ONLY[family]]
        runs += [("1gbit", [*inside, mpiexec, "-n", str(p), *me, *opts]) for p in args.ranks]
    results, load = run_links(runs, env, args.shaped)
    rows = []
    for r in results:
        same = [q for q in results if q["link"] == r["link"] and q["ranks"] == r["ranks"]]
        plain = next((q for q in same if q["stage"] == 0), None)
        err = r["error"]
        rows.append(
            [
                r["link"],
                r["ranks"],
                r["stage"],
                f"{r['step_s'] * 1e3:.0f}",
                f"{r['step_s'] / plain['step_s']:.2f}" if plain else "",
                f"{r['predicted_s'] * 1e3:.0f}",
                f"{err:+.1%}",
                f"{r['link_gbit']:.2f}",
                f"{r['link_latency_us']:.0f}",
            ]
        )
    print(f"model {args.preset}, seq {args.seq}, global batch {args.global_batch}, ", end="")
    print(f"progress {args.progress}; BLAS: {blas_info()}; MPI: {family}")
    header = ["link", "P", "stage", "step ms", "vs plain", "predicted ms", "error"]
    print(table(rows, [*header, "fitted Gbit/s", "fitted α µs"]))
    print(f"load average (1/5/15 min) before and after each run: {load}")
    path = write_results("zero_steps", {"args": vars(args), "results": results, "load": load})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
