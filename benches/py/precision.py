"""Mixed precision side by side: tokens/s and peak RSS of one preset in every ``dtype``, and
kernel-level bf16 against float32 for the GEMM, attention and the MoE layer.

Training: one trainer worker process per dtype (``train_vs_torch.py``'s worker, so each has
its own peak RSS), stepped in lock-step — step i of each dtype in turn, the order rotating —
so a slow phase of the shared machine hits all alike. Reported: median tokens/s over the
steps after ``--skip``, the median per-step time ratio against float32 with its 95 %
interval, peak RSS.

Kernels (in this process, interleaved rounds, ratios against float32 per round), float32
against bf16 both through moecore's Rust kernels:
- GEMM ``[M, K] @ [K, N]``: moecore's GEMM doorway (the grouped matmul with one expert) on
  float32 operands and on bf16 ones (widened to float32 panel by panel while packing, bf16
  result); the dense bf16 entry point (``kernels.bf16.matmul``) and numpy's float32
  OpenBLAS for reference;
- attention forward + backward: the float32 Rust kernel; the bf16 one; the float32 doorway
  bf16 used before (whole arrays converted to float32 and back);
- the MoE layer's kernels forward + backward (router, top-k, permute, fused GELU FFN,
  unpermute and their backward — what ``ops/moe.py`` runs, without autograd): float32
  (``moecore.moe_kernels``) against bf16 (``moecore.kernels.moe_bf16``); and the fused
  expert FFN alone.

Run:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/precision.py
Options: ``--preset`` (moe-small), ``--steps`` (12), ``--skip`` (2), ``--set key=value``,
``--threads`` (2), ``--rounds`` (15, kernel rounds), ``--no-train`` / ``--no-kernels``,
``--baseline DIR`` (another tree's float32 and bf16 trainers in the same lock-step, for a
before/after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
from _common import blas_info, median_interval, paired_times, table, write_results
from train_vs_torch import start_worker

DTYPES = ("float32", "bf16", "fp16", "fp8")


def train_side_by_side(args: argparse.Namespace) -> dict[str, Any]:
    """Every dtype's trainer stepped in lock-step; tokens/s, ratios, peak RSS."""
    from moecore.train.config import build_config, parse_overrides

    cfg = build_config(args.preset, None, parse_overrides(args.set))
    tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    # Each run: label → (dtype, PYTHONPATH or None for this tree's). ``--baseline DIR`` adds
    # bf16 and float32 runs of another tree (DIR/python), stepped in the same lock-step.
    runs: dict[str, tuple[str, str | None]] = {d: (d, None) for d in DTYPES}
    if args.baseline:
        base = str(Path(args.baseline).resolve() / "python")
        for d in ("float32", "bf16"):
            runs[f"{d} (baseline)"] = (d, base)
    workers = {}
    for label, (d, path) in runs.items():
        argv = ["--preset", args.preset, "--set", f"dtype={d}"]
        for pair in args.set:
            argv += ["--set", pair]
        before = os.environ.get("PYTHONPATH")
        if path is not None:
            os.environ["PYTHONPATH"] = path  # the worker inherits it
        try:
            workers[label] = start_worker("moecore", argv, args.threads)
        finally:
            if before is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = before
    labels = list(runs)
    times: dict[str, list[float]] = {d: [] for d in labels}
    losses: dict[str, float] = {}
    try:
        for step in range(args.steps):
            order = labels[step % len(labels) :] + labels[: step % len(labels)]
            for d in order:
                r = workers[d].ask("step")
                times[d].append(r["seconds"])
                losses[d] = r["loss"]
        rss = {d: w.ask("rss")["peak_rss_mib"] for d, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    out = {}
    for d in labels:
        kept = times[d][args.skip :]
        ratios = [t / b for t, b in zip(kept, times["float32"][args.skip :])]
        low, high = median_interval(ratios)
        out[d] = {
            "tokens_per_s": tokens / statistics.median(kept),
            "time_ratio": statistics.median(ratios),
            "ratio_low": low,
            "ratio_high": high,
            "peak_rss_mib": rss[d],
            "last_loss": losses[d],
        }
    return out


def _moe_layer_step(kern: Any, x: Any, router_w: Any, w1: Any, w2: Any, k: int) -> None:
    """One MoE layer's kernels forward and backward (what ``ops/moe.py`` calls, without
    autograd): router, top-k, permute, fused GELU FFN, unpermute, and their backward."""
    t, e = x.shape[0], router_w.shape[0]
    logits = kern.router_logits(x, router_w)
    idx, weights, probs = kern.route(logits, k)
    x_sorted, order, counts = kern.permute(x, idx, e)
    h, a, y_sorted = kern.gelu_ffn(x_sorted, counts, w1, w2)
    y = kern.unpermute(y_sorted, order, weights)
    d_y_sorted, d_weights = kern.unpermute_backward(y, y_sorted, order, weights)
    d_x_sorted, _, _ = kern.gelu_ffn_backward(x_sorted, counts, w1, w2, h, a, d_y_sorted)
    d_x = kern.permute_backward(d_x_sorted, order, t, k)
    d_logits = kern.route_backward(d_weights, idx, probs)
    kern.router_backward(d_logits, x, router_w, d_x)


def kernels_side_by_side(rounds: int) -> dict[str, Any]:
    """bf16 against float32 through moecore's kernels: the GEMM, attention, the MoE layer."""
    import ml_dtypes

    from moecore import moe_kernels
    from moecore.kernels import bf16 as bf16_kernels
    from moecore.kernels import moe_bf16
    from moecore.kernels.attention import RustAttention
    from moecore.kernels.lowp import DoorwayAttention

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}

    # The GEMM: moecore's GEMM doorway (rust/linalg) through the grouped matmul with one
    # expert, float32 against bf16 operands (widened while packing); numpy's OpenBLAS and
    # the dense bf16 entry point for reference.
    for m, kk, n in ((2048, 256, 512), (2048, 512, 256)):
        a = rng.standard_normal((m, kk)).astype(np.float32)
        w = (rng.standard_normal((1, kk, n)) / np.sqrt(kk)).astype(np.float32)
        ab, wb = a.astype(bf16), w.astype(bf16)
        one = np.array([m], np.int32)
        out[f"gemm {m}x{kk}x{n}"] = paired_times(
            {
                "float32": lambda a=a, w=w, one=one: moe_kernels.grouped_matmul(a, one, w),
                "bf16": lambda ab=ab, wb=wb, one=one: moe_bf16.grouped_matmul(ab, one, wb),
                "bf16 dense entry": lambda ab=ab, wb=wb: bf16_kernels.matmul(ab, wb[0]),
                "float32 numpy (OpenBLAS)": lambda a=a, w=w: a @ w[0],
            },
            rounds,
        )

    bsz, t, h, hd = 8, 256, 4, 32
    qkv = rng.standard_normal((bsz, t, 3 * h * hd)).astype(np.float32)
    g = rng.standard_normal((bsz, t, h * hd)).astype(np.float32)
    qkv_b, g_b = qkv.astype(bf16), g.astype(bf16)
    dims = (bsz, t, h, h * hd)

    def attention(impl: Any, x: Any, dy: Any) -> None:
        _, saved = impl.forward(x, h, True, None)
        impl.backward(dy, saved, dims, True, None)

    out["attention fwd+bwd 8x256x128"] = paired_times(
        {
            "float32": lambda: attention(RustAttention, qkv, g),
            "bf16": lambda: attention(bf16_kernels.BF16Attention, qkv_b, g_b),
            "bf16 float32 doorway (before)": lambda: attention(DoorwayAttention, qkv_b, g_b),
        },
        rounds,
    )

    tokens, d, hidden, e, k = 2048, 256, 512, 8, 2
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    router_w = (rng.standard_normal((e, d)) * 0.02).astype(np.float32)
    w1 = (rng.standard_normal((e, d, hidden)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((e, hidden, d)) / np.sqrt(hidden)).astype(np.float32)
    xb, w1b, w2b = x.astype(bf16), w1.astype(bf16), w2.astype(bf16)
    out["MoE layer kernels fwd+bwd 2048 tok, d 256, h 512, 8 experts top-2"] = paired_times(
        {
            "float32": lambda: _moe_layer_step(moe_kernels, x, router_w, w1, w2, k),
            "bf16": lambda: _moe_layer_step(moe_bf16, xb, router_w, w1b, w2b, k),
        },
        rounds,
    )
    h_x = x.astype(bf16)
    counts = np.full(e, tokens * k // e, np.int32)
    xs = np.repeat(x, k, axis=0)
    xsb = np.repeat(h_x, k, axis=0)
    out["expert FFN fwd+bwd (fused GELU) 4096 rows"] = paired_times(
        {
            "float32": lambda: moe_kernels.gelu_ffn_backward(
                xs, counts, w1, w2, *moe_kernels.gelu_ffn(xs, counts, w1, w2)[:2], xs
            ),
            "bf16": lambda: moe_bf16.gelu_ffn_backward(
                xsb, counts, w1b, w2b, *moe_bf16.gelu_ffn(xsb, counts, w1b, w2b)[:2], xsb
            ),
        },
        rounds,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument(
        "--baseline",
        metavar="DIR",
        help="another moecore tree: its float32 and bf16 runs join the lock-step",
    )
    args = ap.parse_args()
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    print(f"BLAS: {blas_info()}")
    payload: dict[str, Any] = {"args": vars(args)}
    if not args.no_train:
        train = train_side_by_side(args)
        payload["train"] = train
        rows = [
            [
                d,
                f"{r['tokens_per_s']:.0f}",
                f"{r['time_ratio']:.2f} [{r['ratio_low']:.2f}, {r['ratio_high']:.2f}]",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['last_loss']:.4f}",
            ]
            for d, r in train.items()
        ]
        header = ["dtype", "tokens/s", "time / float32 [95 %]", "peak RSS MiB", "last loss"]
        print(f"\n{args.preset}, {args.steps} steps ({args.skip} skipped), lock-step")
        print(table(rows, header))
    if not args.no_kernels:
        kernels = kernels_side_by_side(args.rounds)
        payload["kernels"] = kernels
        rows = [
            [
                kernel,
                side,
                f"{s['median_s'] * 1e3:.2f}",
                f"{s['ratio']:.2f} [{s['ratio_low']:.2f}, {s['ratio_high']:.2f}]",
            ]
            for kernel, sides in kernels.items()
            for side, s in sides.items()
        ]
        print(f"\nkernels, {args.rounds} interleaved rounds")
        print(table(rows, ["kernel", "path", "median ms", "time / float32 [95 %]"]))
    print(f"\nresults: {write_results('precision', payload)}")


if __name__ == "__main__":
    main()
