"""Data parallelism over MPI on this machine (loopback): step time with 1 vs 2 ranks, dense
vs top-k compressed, fifo vs priority, and how much communication backward hides.

Run (release build and the ``mpi`` extra installed)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/dist.py [--preset moe-small]

It launches itself once as a single process and once under ``mpiexec -n 2 python -m mpi4py``
(one BLAS thread per rank). All the variants are built first; then, in ``--rounds`` rounds,
each runs ``--steps`` timed steps in turn (2 warm-up steps first), so that load from other
work on the machine spreads over the variants; medians over all their steps are reported.
Every step is of the model at the same global batch, by default the preset's own
(``moe-small``: 16 sequences of 256 tokens, what ``moecore train`` runs; ``--global-batch``
and ``--seq`` take a smaller one, whose shorter step makes the per-step cost of
compression, which does not depend on the batch, a larger share). It times forward,
backward (which includes the gradient hooks and the launches), and ``finish`` (what is left
of the communication).
The *exposed* communication of a step is how long rank 0's ``finish`` lasts past the end of
the slowest rank's backward (each rank's times are taken from the barrier that starts the
step): a rank that finished backward early also waits for the other one, and that wait
is load imbalance, not communication (the ``none`` variant, a barrier after backward, pays
it too: its ``finish`` is in the JSON); plus the time backward itself was held by waits
(the priority policy waits for credit). Then, on the same gradients, it times the
communication alone (blocking: one all-reduce of every bucket, or compress + all-gather +
decode), so ``hidden = 1 − exposed / alone``. The scheduler's own cost (every decision of a
step, no communication) is timed against the 1-rank step. Correctness: after the runs the
ranks' parameters are compared (they must be identical). Results go to
``benches/results/dist.json``.

With ``--shaped`` (root) the 2-rank run is repeated inside a network namespace whose
loopback is shaped to 1 Gbit/s with ``tc … tbf`` (MPICH or Open MPI, whichever ``mpiexec``
sits beside this Python, forced onto TCP), deleted afterwards.
The ``*-bf16wire`` variants send each dense bucket as bfloat16 (``wire_dtype``; "bucket MiB"
is what the all-reduces carry; the simulator sees them as 2-byte gradients under halved
caps: the same buckets, with the bytes sent, but not the rounding and widening passes).
``--variants a,b`` runs only those.
Next to each measured step: the simulator's prediction (``moecore.comm.simulate``) from a
profiled step of the same rank and an α–β link fitted to blocking all-reduces of 4 KiB and
16 MiB on the same group.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import blas_info, table, write_results

from moecore.distributed.launch import mpi_family

VARIANTS = [
    ("none", {}),  # every rank trains alone: no gradient communication, one barrier
    ("dense-fifo", {"policy": "fifo"}),
    ("dense-priority", {"policy": "priority"}),
    ("dense-fifo-4MB", {"policy": "fifo", "bucket_mb": 4}),
    ("dense-fifo-4MB-thread", {"policy": "fifo", "bucket_mb": 4, "progress": "thread"}),
    ("dense-priority-thread", {"policy": "priority", "progress": "thread"}),
    # A credit below a bucket (25 MiB): its parts wait for one another inside backward.
    ("dense-priority-credit16", {"policy": "priority", "credit_mb": 16}),
    ("topk-0.01", {"compress": "topk:0.01", "compress_when": "always"}),
    ("topk-0.001", {"compress": "topk:0.001", "compress_when": "always"}),
    # The bf16 wire format (run key grad_wire_dtype): half the bytes of each bucket.
    ("dense-fifo-bf16wire", {"policy": "fifo", "wire_dtype": "bfloat16"}),
    ("dense-priority-bf16wire", {"policy": "priority", "wire_dtype": "bfloat16"}),
    (
        "topk-0.01-thread",
        {"compress": "topk:0.01", "compress_when": "always", "progress": "thread"},
    ),
]
# As the trainer runs it: gradients stay in their buckets (no copy back per step).
DP_ALWAYS = {"gradient_as_bucket_view": True}

NAMESPACE = "moecore-shaped"


@contextlib.contextmanager
def shaped_namespace(wanted: bool):
    """A network namespace whose loopback is shaped to 1 Gbit/s with tbf (netem is not
    available here), deleted afterwards whatever happens."""
    if not wanted:
        yield
        return
    if os.geteuid() != 0:
        raise SystemExit("--shaped needs root (network namespaces and tc)")
    subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
    try:
        ns = ["ip", "netns", "exec", NAMESPACE]
        subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True)
        tbf = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit"]
        subprocess.run([*ns, *tbf, "burst", "256kb", "latency", "50ms"], check=True)
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)


def mpi_launcher(env: dict[str, str]) -> tuple[str, str]:
    """The ``mpiexec`` beside this Python and its MPI family; lets Open MPI run as root
    (in ``env``)."""
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    family = mpi_family(mpiexec)
    if family is None:
        raise SystemExit(f"{mpiexec} is neither MPICH nor Open MPI")
    if family == "Open MPI" and os.geteuid() == 0:
        env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    return mpiexec, family


def run_links(
    runs: list[tuple[str, list[str]]], env: dict[str, str], shaped: bool
) -> tuple[list[dict], list[list[str]]]:
    """Runs each ``(link, command)`` (inside the shaped namespace when ``shaped``) and
    collects the ``RESULT`` JSON list its rank 0 prints, each record tagged with its link;
    also the load average before and after each run."""
    results: list[dict] = []
    load = [open("/proc/loadavg").read().split()[:3]]
    with shaped_namespace(shaped):
        for link, cmd in runs:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=env,
                timeout=3600,
            )
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
            results += [{"link": link, **r} for r in json.loads(line[0][7:])]
            load.append(open("/proc/loadavg").read().split()[:3])
    return results, load


def _model(preset: str, seq: int):
    import moecore as mc
    from moecore.models import MoETransformer
    from moecore.models.config import ModelConfig
    from moecore.train.config import build_config

    cfg = build_config(preset, overrides={"seq_len": seq})
    mc.manual_seed(0)
    return MoETransformer(ModelConfig.from_run(cfg)), cfg


def _batch(cfg, step: int, rows: int, rank: int):
    rng = np.random.default_rng(step)
    ids = rng.integers(0, cfg.vocab_size, size=(rows * 64, cfg.seq_len + 1))
    mine = ids[rank * rows : (rank + 1) * rows]
    return mine[:, :-1], mine[:, 1:]


def _comm_alone(dp, group, repeat: int = 3) -> float:
    """Median seconds of the step's communication done blocking, on the current buckets."""
    times = []
    for _ in range(repeat):
        group.barrier()
        t0 = time.perf_counter()
        reqs = []
        for b, buf in enumerate(dp.buffers):
            if dp._wire is not None:  # rounding, the bf16 all-reduce, widening
                wire = dp._wire[b]
                wire[...] = buf
                reqs.append(group.iallreduce(wire, on_done=dp._widener(wire, buf)))
            elif dp.compressor is None:
                reqs.append(group.iallreduce(buf))
            else:
                reqs.append(dp._launch_compressed(b, buf))
            reqs[-1].wait()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _link(group, nbytes: int = 16 << 20):
    """An α–β link fitted to blocking all-reduces of 4 KiB and 16 MiB on this group."""
    from moecore.comm import Link

    ts = []
    for n in (1024, nbytes // 4):
        buf = np.ones(n, np.float32)
        for _ in range(2):
            group.allreduce(buf)
        times = []
        for _ in range(5):
            group.barrier()
            t0 = time.perf_counter()
            group.allreduce(buf)
            times.append(time.perf_counter() - t0)
        ts.append(float(np.median(times)))
    p = group.size
    # Ring: t = 2(P−1)α + 2(P−1)/P · bytes/β.
    beta = 2 * (p - 1) / p * (nbytes - 4096) / max(ts[1] - ts[0], 1e-9)
    alpha = max(0.0, (ts[0] - 2 * (p - 1) / p * 4096 / beta) / (2 * (p - 1)))
    return Link(alpha, beta * 8 / 1e9)


def _predict(dp, profile, link, group) -> float:
    from moecore.comm import CostModel, GradSpec, Scheduler, simulate
    from moecore.train.plan import compression_costs, copy_cost

    ratio = None if dp.compressor is None else dp.compressor.ratio
    per_elem, per_entry = compression_costs(ratio or 0.01)
    cost = CostModel(
        intra=link,
        inter=link,
        compress_s_per_elem=per_elem,
        decode_s_per_entry=per_entry,
        copy_s_per_byte=copy_cost(),
    )
    s = dp.scheduler
    grads, shrink = s.grads, 1.0
    if dp.wire_dtype != "float32":
        # The simulator sizes buckets by bytes: 2-byte gradients under caps halved give the
        # same buckets (in elements) with the bytes the bf16 wire sends.
        grads = [GradSpec(g.name, g.numel, "float16", g.layer) for g in grads]
        shrink = 0.5
    fresh = Scheduler(
        grads,
        world=group.size,
        bucket_mb=dp.settings["bucket_mb"] * shrink,
        first_bucket_mb=dp.settings["first_bucket_mb"] * shrink,
        policy=s.policy,
        credit_mb=dp.settings["credit_mb"] * shrink,
        compress_ratio=ratio,
        compress_when=dp.settings["compress_when"],
    )
    return simulate(fresh, profile, cost)["step_s"]


def worker(args: argparse.Namespace) -> None:
    import moecore.distributed as dist
    from moecore import optim
    from moecore.train.plan import profile_step

    group = dist.init()
    rows = args.global_batch // group.size
    out = []
    link = _link(group) if group.size > 1 else None
    chosen = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(",")]
    variants = chosen if group.size > 1 else VARIANTS[:1]
    runs = []
    for name, kw in variants:
        model, cfg = _model(args.preset, args.seq)
        opt = optim.SGD(model.parameters(), lr=1e-3)
        x, y = _batch(cfg, 0, rows, group.rank)
        profile = profile_step(model, x, y, opt)  # before the hooks exist
        dp = None if name == "none" else dist.DataParallel(model, group, **kw, **DP_ALWAYS)
        if dp is not None:
            # The variant's settings, DataParallel's defaults for the rest (for the simulator).
            defaults = inspect.signature(dist.DataParallel).parameters
            dp.settings = {
                k: kw.get(k, defaults[k].default)
                for k in ("credit_mb", "bucket_mb", "first_bucket_mb", "compress_when")
            }
        rec: dict[str, list[float]] = {
            k: [] for k in ("fwd", "bwd", "finish", "step", "bwd_end", "finish_end", "held")
        }
        runs.append((name, model, cfg, opt, dp, profile, rec))
    # Rounds: every variant takes a few steps in turn (in a rotated order), so a burst of
    # load on this shared machine lands on several variants instead of spoiling one.
    done = [0] * len(runs)
    for r in range(args.rounds):
        for v in [(r + j) % len(runs) for j in range(len(runs))]:
            name, model, cfg, opt, dp, profile, rec = runs[v]
            warm = 2 if r == 0 else 0
            for _ in range(warm + args.steps):
                step, done[v] = done[v], done[v] + 1
                x, y = _batch(cfg, step, rows, group.rank)
                group.barrier()
                t0 = time.perf_counter()
                loss = model(x, y)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                if dp is not None:
                    dp.finish()
                else:
                    group.barrier()  # no communication: only the wait for the slower rank
                t3 = time.perf_counter()
                opt.step()
                opt.zero_grad()
                t4 = time.perf_counter()
                if step >= 2:
                    for k, t in (("fwd", t1 - t0), ("bwd", t2 - t1), ("finish", t3 - t2)):
                        rec[k].append(t)
                    rec["step"].append(t4 - t0)
                    # Since the barrier, for the exposure past the slowest rank's backward.
                    rec["bwd_end"].append(t2 - t0)
                    rec["finish_end"].append(t3 - t0)
                    held = 0.0 if dp is None else dp.last_stats["backward_wait_seconds"]
                    rec["held"].append(held)
    for name, model, _cfg, _opt, dp, profile, rec in runs:
        bwd_end = np.empty((group.size, len(rec["bwd_end"])))
        group.allgather(np.asarray(rec.pop("bwd_end")), bwd_end)
        finish_end = np.asarray(rec.pop("finish_end"))
        # Communication left once every rank's backward ended: what a rank's `finish` waits
        # for beyond the other rank's later backward (load imbalance, which "none" pays too).
        # Plus the waits that held backward (the priority policy's credit).
        past = np.maximum(0.0, finish_end - bwd_end.max(axis=0))
        rec["exposed"] = list(past + np.asarray(rec["held"]))
        med = {k: float(np.median(v)) for k, v in rec.items()}
        if dp is not None:
            dp.remove_hooks()
            med["alone"] = _comm_alone(dp, group)
            med["predicted"] = _predict(dp, profile, link, group)
            if dp.compressor is None:  # the buckets' bytes as all-reduced
                med["wire_mb"] = sum(w.nbytes for w in (dp._wire or dp.buffers)) / 2**20
            med["link_gbit"] = link.gbit_per_s
            med["link_latency_us"] = link.latency_s * 1e6
            med["buckets"] = len(dp.buckets)
            med["allgather_bytes"] = dp.last_stats.get("allgather_bytes", 0)
            med["in_backward"] = dp.last_stats.get("launched_in_backward", 0)
            med["at_finish"] = dp.last_stats.get("launched_at_finish", 0)
            params = np.concatenate([p.data.ravel() for p in model.parameters()])
            got = np.empty((group.size, params.size), np.float32)
            group.allgather(params, got)
            med["ranks_identical"] = bool((got == got[0]).all())
        if group.size == 1:
            med["scheduler_s"] = _scheduler_cost(model)
        med["params"] = int(sum(p.data.size for p in model.parameters()))
        out.append({"variant": name, "ranks": group.size, **med})
    if group.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


#: Environment forcing each MPI onto TCP over the namespace's loopback. Open MPI's TCP
#: transport skips loopback interfaces unless told, and the namespace has no other.
TCP_ONLY = {
    "MPICH": ["MPIR_CVAR_CH4_NETMOD=ofi", "FI_PROVIDER=tcp", "MPIR_CVAR_NOLOCAL=1"],
    "Open MPI": ["OMPI_MCA_pml=ob1", "OMPI_MCA_btl=tcp,self", "OMPI_MCA_btl_tcp_if_include=lo"],
}


def _scheduler_cost(model, repeat: int = 20) -> float:
    """Seconds of one step of scheduler decisions (begin, one ready per gradient, finish)."""
    from moecore.comm import GradSpec, Scheduler

    specs = [GradSpec(n, p.data.size, layer=i) for i, (n, p) in enumerate(model.named_parameters())]
    s = Scheduler(specs, world=2)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        s.begin_step()
        for i in reversed(range(len(specs))):
            s.ready(i)
        s.finish()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (the preset's)")
    ap.add_argument(
        "--global-batch", type=int, default=None, help="sequences per step (the preset's)"
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all the variants")
    ap.add_argument(
        "--shaped",
        action="store_true",
        help="also run 2 ranks in a network namespace shaped to 1 Gbit/s (root; cleaned up)",
    )
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
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
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    me = [sys.executable, "-m", "mpi4py", __file__, "--worker"]
    opts = ["--preset", args.preset, "--seq", str(args.seq)]
    opts += ["--global-batch", str(args.global_batch), "--steps", str(args.steps)]
    opts += ["--rounds", str(args.rounds), "--variants", args.variants]
    mpiexec, family = mpi_launcher(env)
    runs = [("loopback", [*me, *opts]), ("loopback", [mpiexec, "-n", "2", *me, *opts])]
    if args.shaped:
        # TCP (no shared memory) inside the namespace, whose loopback is shaped.
        inside = ["ip", "netns", "exec", NAMESPACE, "env", *TCP_ONLY[family]]
        runs.append(("1gbit", [*inside, mpiexec, "-n", "2", *me, *opts]))
    results, load = run_links(runs, env, args.shaped)
    base = results[0]
    rows = []
    for r in results:
        exposed = r["exposed"]
        alone = r.get("alone")
        hidden = "" if not alone else f"{max(0.0, 1 - exposed / alone):.0%}"
        rows.append(
            [
                r["link"],
                r["variant"],
                r["ranks"],
                f"{r['step'] * 1e3:.0f}",
                f"{r['fwd'] * 1e3:.0f}",
                f"{r['bwd'] * 1e3:.0f}",
                f"{exposed * 1e3:.1f}",
                "" if alone is None else f"{alone * 1e3:.1f}",
                f"{r['wire_mb']:.1f}" if "wire_mb" in r else "",
                hidden,
                f"{r['step'] / base['step']:.2f}",
                f"{r['predicted'] * 1e3:.0f}" if "predicted" in r else "",
                r.get("ranks_identical", ""),
            ]
        )
    print(f"model {args.preset}: {base['params']:,} parameters, seq {args.seq}, ", end="")
    print(f"global batch {args.global_batch}; BLAS: {blas_info()}; MPI: {family}")
    print(
        table(
            rows,
            [
                "link",
                "variant",
                "ranks",
                "step ms",
                "fwd ms",
                "bwd ms",
                "exposed ms",
                "comm alone ms",
                "bucket MiB",
                "hidden",
                "step / 1-rank",
                "predicted ms",
                "ranks equal",
            ],
        )
    )
    sched = base["scheduler_s"]
    print(
        f"scheduler decisions per step: {sched * 1e6:.0f} us = {sched / base['step']:.2%} "
        "of the 1-rank step"
    )
    print(f"load average (1/5/15 min) before, after 1 rank, after 2 ranks: {load}")
    path = write_results("dist", {"args": vars(args), "results": results, "load": load})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
