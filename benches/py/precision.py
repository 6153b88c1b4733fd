"""Mixed precision side by side: tokens/s and peak RSS of one preset in every ``dtype``, and
kernel-level bf16 against float32 for the GEMM, attention and the MoE layer.

Training: one trainer worker process per dtype (``train_vs_torch.py``'s worker, so each has
its own peak RSS), stepped in lock-step — step i of each dtype in turn, the order rotating —
so a slow phase of the shared machine hits all alike. Reported: median tokens/s over the
steps after ``--skip``, the median per-step time ratio against float32 with its 95 %
interval, peak RSS.

Kernels (in this process, interleaved rounds, ratios against float32 per round):
- GEMM ``[M, K] @ [K, N]``: float32 numpy (OpenBLAS); bf16 through the float32 doorway
  (operands converted to float32, the float32 GEMM, the result stored as bf16 —
  what ``kernels/lowp.py`` does for the norm and attention families); ml_dtypes' own bf16
  ``matmul`` (numpy's generic loop);
- attention forward + backward: the float32 Rust kernel; its bf16 doorway;
- MoE layer forward + backward (``nn.MoE``): float32; with bf16 rounding as a bf16 run
  does it (``nn/precision.py``: weights' compute copies, rounded input/output).

Run:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/precision.py
Options: ``--preset`` (moe-small), ``--steps`` (12), ``--skip`` (2), ``--set key=value``,
``--threads`` (2), ``--rounds`` (15, kernel rounds), ``--no-train`` / ``--no-kernels``.
"""

from __future__ import annotations

import argparse
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
    workers = {}
    for d in DTYPES:
        argv = ["--preset", args.preset, "--set", f"dtype={d}"]
        for pair in args.set:
            argv += ["--set", pair]
        workers[d] = start_worker("moecore", argv, args.threads)
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    losses: dict[str, float] = {}
    try:
        for step in range(args.steps):
            order = DTYPES[step % len(DTYPES) :] + DTYPES[: step % len(DTYPES)]
            for d in order:
                r = workers[d].ask("step")
                times[d].append(r["seconds"])
                losses[d] = r["loss"]
        rss = {d: w.ask("rss")["peak_rss_mib"] for d, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    out = {}
    for d in DTYPES:
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


def kernels_side_by_side(rounds: int) -> dict[str, Any]:
    """bf16 against float32 for the GEMM, attention and the MoE layer."""
    import ml_dtypes

    import moecore
    from moecore import nn
    from moecore.kernels.attention import RustAttention
    from moecore.kernels.registry import select_for
    from moecore.nn.precision import apply_precision, compute_copy_fn
    from moecore.optim import MasterWeights

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}

    a = rng.standard_normal((1024, 512)).astype(np.float32)
    b = rng.standard_normal((512, 1024)).astype(np.float32)
    ab, bb = a.astype(bf16), b.astype(bf16)
    small_a, small_b = ab[:256, :256], bb[:256, :256]
    out["gemm 1024x512x1024"] = paired_times(
        {
            "float32": lambda: a @ b,
            "bf16 doorway": lambda: (ab.astype(np.float32) @ bb.astype(np.float32)).astype(bf16),
        },
        rounds,
    )
    out["gemm 256x256x256"] = paired_times(
        {
            "float32": lambda: a[:256, :256] @ b[:256, :256],
            "bf16 doorway": lambda: (
                small_a.astype(np.float32) @ small_b.astype(np.float32)
            ).astype(bf16),
            "bf16 ml_dtypes matmul": lambda: small_a @ small_b,
        },
        rounds,
    )

    bsz, t, h, hd = 8, 256, 4, 32
    qkv = rng.standard_normal((bsz, t, 3 * h * hd)).astype(np.float32)
    g = rng.standard_normal((bsz, t, h * hd)).astype(np.float32)
    qkv_b, g_b = qkv.astype(bf16), g.astype(bf16)
    doorway = select_for("attention", qkv_b)
    dims = (bsz, t, h, h * hd)

    def attention(impl: Any, x: Any, dy: Any) -> None:
        _, saved = impl.forward(x, h, True, None)
        impl.backward(dy, saved, dims, True, None)

    out["attention fwd+bwd 8x256x128"] = paired_times(
        {
            "float32": lambda: attention(RustAttention, qkv, g),
            "bf16 doorway": lambda: attention(doorway, qkv_b, g_b),
        },
        rounds,
    )

    moecore.manual_seed(0)
    layers = {}
    for name in ("float32", "bf16"):
        moecore.manual_seed(0)
        layer = nn.MoE(256, 512, 8, top_k=2)
        masters = MasterWeights(layer.parameters(), bf16, compute_copy_fn(layer, name))
        apply_precision(layer, name)
        layers[name] = (layer, masters)
    x = rng.standard_normal((8 * 256, 256)).astype(np.float32)

    def moe(name: str) -> None:
        layer, masters = layers[name]
        with masters.compute_copies():
            xt = moecore.Tensor(x, requires_grad=True)
            layer(xt).sum().backward()
        layer.zero_grad()

    out["MoE layer fwd+bwd 2048 tok, d 256, 8 experts top-2"] = paired_times(
        {"float32": lambda: moe("float32"), "bf16 rounding": lambda: moe("bf16")}, rounds
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
