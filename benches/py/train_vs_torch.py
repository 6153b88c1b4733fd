"""The moe-small run: moecore against the same model, data order and schedule in PyTorch eager.

Both trainers run as separate worker processes (so each has its own peak RSS) driven step by
step in lock-step by this script: step i of moecore, then step i of torch, and so on, so
that machine noise hits both alike. Both start from the very same weights (torch loads
moecore's initial state_dict) and see the very same batches (``moecore.data.train_batch``).

Reported: tokens/s (median of steps 20–100), peak RSS, validation loss at steps 100, 300 and
600, model FLOPs utilisation against the dense GEMM GFLOP/s measured in the same run, and the
end-to-end wall time of each run.

Run (torch from PyPI, for the benchmark only):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/train_vs_torch.py
(``--torch-python=/work/venv-torch/bin/python`` runs the torch worker under another venv's
interpreter, so torch need not be installed beside moecore.)
Options: ``--steps`` (600), ``--preset`` (moe-small), ``--set key=value`` (repeatable).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Worker, blas_info, table, torch_python, write_results

EVAL_AT = (100, 300, 600)


# -- workers ---------------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serve(step: Any, evaluate: Any) -> None:
    """Answers the driver's commands, one JSON line each: step, eval, rss, quit."""
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            reply = {
                "loss": loss,
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": time.process_time() - c0,
            }
        elif cmd == "eval":
            reply = {"val_loss": evaluate()}
        elif cmd == "rss":
            reply = {"peak_rss_mib": _peak_rss_mib()}
        else:
            return
        print(json.dumps(reply), flush=True)


def _config(args: argparse.Namespace) -> Any:
    from moecore.train.config import build_config, parse_overrides

    return build_config(args.preset, None, parse_overrides(args.set))


def moecore_worker(args: argparse.Namespace) -> None:
    import tempfile

    from moecore.train.trainer import Trainer

    config = _config(args)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir), out=open(os.devnull, "w"))
        print(json.dumps({"ready": True}), flush=True)
        _serve(lambda: float(trainer._train_step()["loss"]), trainer.evaluate)


def torch_worker(args: argparse.Namespace) -> None:
    import torch
    from _torch_moe_model import build

    from moecore.data import load_corpus, train_batch, val_batches
    from moecore.optim.schedule import warmup_cosine

    torch.set_num_threads(args.threads)
    cfg = _config(args)
    state = dict(np.load(args.init))
    model = build(torch, cfg, state)
    del state
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    corpus = load_corpus(cfg.data or None, cfg.vocab or None)
    val = [
        (torch.from_numpy(x), torch.from_numpy(y))
        for x, y in val_batches(corpus.val, cfg.seq_len, cfg.batch_size, cfg.eval_batches)
    ]
    counter = {"step": 0}

    def step() -> float:
        s = counter["step"]
        x, y = train_batch(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed, s, 0)
        model.train()
        ce, aux = model(torch.from_numpy(x), torch.from_numpy(y))
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        lr = warmup_cosine(s, cfg.lr, cfg.warmup_steps, cfg.decay_steps, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter["step"] = s + 1
        return ce.item()

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            return float(np.mean([float(model(x, y)[0]) for x, y in val]))

    print(json.dumps({"ready": True}), flush=True)
    _serve(step, evaluate)


# -- driver ----------------------------------------------------------------------------------
def start_worker(kind: str, argv: list[str], threads: int, python: str | None = None) -> Worker:
    """A trainer worker process of ``kind`` on ``threads`` threads, under ``python`` (default:
    this interpreter)."""
    env = dict(os.environ)
    for var in ("RAYON_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env[var] = str(threads)
    if kind == "moecore":
        # What `moecore train` gets by importing moecore before numpy (this script
        # imports numpy first): OpenBLAS's idle threads sleep at once instead of
        # spinning through the Rust kernels (moecore/_blas_env.py).
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    return Worker(__file__, kind, ["--threads", str(threads), *argv], env, python=python)


def dense_gemm_gflops(threads: int, n: int = 2048, repeat: int = 5) -> float:
    """numpy float32 GEMM GFLOP/s on n×n×n with the trainers' thread count (the roofline
    the MFU is measured against)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        a @ a
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_token(cfg: Any) -> float:
    """Training FLOPs per token, PaLM's convention: 6·N_active + 12·L·d·T (attention
    scores counted for the full T×T, as is usual; causal kernels skip about half of that)."""
    d, layers = cfg.d_model, cfg.n_layers
    per_layer = 4 * d * d + cfg.top_k * 2 * d * cfg.d_ff + cfg.n_experts * d
    n_active = layers * per_layer + d * cfg.vocab_size
    return 6 * n_active + 12 * layers * d * cfg.seq_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["moecore", "torch"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=2, help="threads of each trainer (2)")
    ap.add_argument(
        "--torch-python",
        metavar="PATH",
        help="interpreter with torch for the torch worker (e.g. /work/venv-torch/bin/python)",
    )
    ap.add_argument("--init", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "moecore":
        return moecore_worker(args)
    if args.worker == "torch":
        return torch_worker(args)

    import tempfile

    from moecore.train.trainer import build_model

    cfg = _config(args)
    torch_py = torch_python(args.torch_python)
    if torch_py is None:
        raise SystemExit(
            "torch is not importable here: pass --torch-python=PATH (a venv with torch)"
        )
    print(f"BLAS: {blas_info()}; load average {os.getloadavg()[0]:.2f}")
    gemm = dense_gemm_gflops(args.threads)
    print(f"dense numpy GEMM 2048³, {args.threads} thread(s): {gemm:.1f} GFLOP/s")
    tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    step_flops = flops_per_token(cfg) * tokens
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init.npz"
        np.savez(init, **dict(build_model(cfg).state_dict()))
        passthrough = ["--preset", args.preset] + [f"--set={kv}" for kv in args.set]
        workers = [
            start_worker("moecore", passthrough, args.threads),
            start_worker("torch", [*passthrough, "--init", str(init)], args.threads, torch_py),
        ]
        times: dict[str, list[float]] = {w.kind: [] for w in workers}
        cpu: dict[str, list[float]] = {w.kind: [] for w in workers}
        losses: dict[str, list[float]] = {w.kind: [] for w in workers}
        vals: dict[str, dict[int, float]] = {w.kind: {} for w in workers}
        wall = {w.kind: 0.0 for w in workers}
        for s in range(1, args.steps + 1):
            for w in workers:
                t0 = time.perf_counter()
                r = w.ask("step")
                times[w.kind].append(r["seconds"])
                cpu[w.kind].append(r["cpu_seconds"])
                losses[w.kind].append(r["loss"])
                if s in EVAL_AT or s == args.steps:
                    vals[w.kind][s] = w.ask("eval")["val_loss"]
                wall[w.kind] += time.perf_counter() - t0
            if s % 20 == 0 or s == args.steps:
                print(
                    f"step {s:4d}  loss moecore {losses['moecore'][-1]:.4f} torch "
                    f"{losses['torch'][-1]:.4f}  s/step {times['moecore'][-1]:.3f} / "
                    f"{times['torch'][-1]:.3f}  load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        rss = {w.kind: w.ask("rss")["peak_rss_mib"] for w in workers}
        for w in workers:
            w.close()

    window = slice(min(19, args.steps - 1), min(100, args.steps))
    rows, result = [], {"blas": blas_info(), "dense_gflops": gemm, "steps": args.steps}
    for kind in ("moecore", "torch"):
        med = statistics.median(times[kind][window])
        result[kind] = {
            "median_step_s": med,
            "median_step_cpu_s": statistics.median(cpu[kind][window]),
            "tokens_per_s": tokens / med,
            "mfu": step_flops / med / 1e9 / gemm,
            "peak_rss_mib": rss[kind],
            "val_loss": vals[kind],
            "wall_s": wall[kind],
            "loss_curve": losses[kind],
        }
        r = result[kind]
        rows.append(
            [
                kind,
                f"{r['tokens_per_s']:.0f}",
                f"{med * 1e3:.0f}",
                f"{100 * r['mfu']:.1f}%",
                f"{rss[kind]:.0f}",
            ]
            + [f"{vals[kind][s]:.4f}" if s in vals[kind] else "-" for s in EVAL_AT]
            + [f"{wall[kind]:.0f}"]
        )
    speed = result["moecore"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    print(
        f"\n{cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_experts} experts top-{cfg.top_k}, "
        f"{tokens} tokens/step, {step_flops / 1e9:.1f} GFLOP/step (6N + 12LdT)"
    )
    print(
        table(
            rows,
            ["trainer", "tokens/s", "ms/step", "MFU", "peak RSS MiB"]
            + [f"val@{s}" for s in EVAL_AT]
            + ["wall s"],
        )
    )
    print(f"moecore / torch tokens/s: {speed:.2f}x ({args.threads} threads each)")
    cpu_ratio = result["torch"]["median_step_cpu_s"] / result["moecore"]["median_step_cpu_s"]
    print(f"torch / moecore CPU seconds per step: {cpu_ratio:.2f}x")
    last = max(set(vals["moecore"]) & set(vals["torch"]), default=None)
    if last is not None:
        gap = vals["moecore"][last] / vals["torch"][last] - 1
        print(f"val loss at step {last}: moecore {100 * gap:+.2f}% vs torch")
        result["val_gap_at_last"] = gap
    result["speedup"] = speed
    print(f"written {write_results('train_vs_torch', result)}")


if __name__ == "__main__":
    main()
