"""``moecore prepare`` speed, and bytes against BPE tokens at equal training FLOPs.

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/prepare.py
          [--rounds N] [--preset moe-tiny] [--budget-steps 300] [--skip-train] [--skip-speed]

1. Tokens/s of ``prepare`` on the built-in corpus (12 MB of standard-library source) with 1
   and 2 processes, for the byte tokenizer and a 4,096-id BPE (trained once first), rounds
   interleaved, median and range; 1 MiB shards so two processes have shards to share. The
   time includes starting the processes and writing the shards.
2. The preset trained on the built-in corpus tokenized as bytes, as a 4,096- and as a
   32,000-id byte-level BPE, for the same training FLOPs: the byte run takes
   ``--budget-steps`` steps and the others as many as the same FLOPs buy. FLOPs per token
   are 6 · (active matrix parameters + vocabulary · d_model for the tied output layer) +
   6 · n_layers · seq_len · d_model (attention). Validation (the same whole documents for
   every tokenizer: the last 5% of the bytes) is reported in bits per byte:
   nats/token · validation tokens / validation bytes / ln 2.
"""

from __future__ import annotations

import argparse
import io
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from moecore.data import open_prepared
from moecore.data.prepare import prepare
from moecore.train import Trainer, build_config
from moecore.train.trainer import build_model


def prepare_speed(work: Path, bpe: Path, rounds: int) -> None:
    """Part 1: tokens/s of prepare, interleaved rounds."""
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, tok in (("bytes", "bytes"), ("bpe-4096", str(bpe))):
            for workers in (1, 2):
                out = work / f"speed-{name}-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                index = prepare(
                    ["builtin"], out, tokenizer=tok, workers=workers, shard_mb=1, log=io.StringIO()
                )
                rate = index["tokens"] / (time.perf_counter() - t0)
                results.setdefault((name, workers), []).append(rate)
                shutil.rmtree(out)
    print("prepare on the built-in corpus (1 MiB shards), tokens/s: median [min, max]")
    for (name, workers), rates in results.items():
        print(
            f"  {name:<9} {workers} process{'es' if workers > 1 else '  '}  "
            f"{statistics.median(rates):>12,.0f}  [{min(rates):,.0f}, {max(rates):,.0f}]"
        )


def flops_per_token(config: Any) -> float:
    """Training FLOPs per token: 6 per active matrix weight (experts at top_k / n_experts,
    the tied output layer included) plus attention's 6 · layers · seq_len · d_model."""
    model = build_model(config)
    active = 0.0
    for name, p in model.named_parameters():
        if p.data.ndim < 2 or name in ("pos_emb", "tok_emb.weight"):
            continue
        share = config.top_k / config.n_experts if p.data.ndim == 3 else 1.0
        active += share * p.data.size
    active += config.vocab_size * config.d_model  # the output layer (tied to tok_emb)
    return 6 * active + 6 * config.n_layers * config.seq_len * config.d_model


def equal_flops(work: Path, folders: dict[str, Path], preset: str, budget_steps: int) -> None:
    """Part 2: each tokenizer trained for the FLOPs of ``budget_steps`` byte-level steps."""
    base = build_config(preset, overrides={"data": str(folders["bytes"])})
    tokens_per_step = base.batch_size * base.seq_len
    budget = flops_per_token(base) * tokens_per_step * budget_steps
    print(
        f"\n{preset}, batch {base.batch_size} × seq_len {base.seq_len}, "
        f"budget {budget:.3g} FLOPs ({budget_steps} byte-level steps)"
    )
    print(
        f"  {'tokens':<9} {'vocab':>6} {'FLOPs/step':>11} {'steps':>6} {'val nats/tok':>12} "
        f"{'tok/byte':>8} {'bits/byte':>9} {'seconds':>8}"
    )
    for name, folder in folders.items():
        config = build_config(preset, overrides={"data": str(folder)})
        per_step = flops_per_token(config) * tokens_per_step
        steps = max(1, round(budget / per_step))
        config = build_config(
            preset,
            overrides={
                "data": str(folder),
                "steps": steps,
                "decay_steps": steps,
                "warmup_steps": max(1, min(50, steps // 10)),
                "eval_every": 0,
                "checkpoint_every": 0,
                "eval_batches": 16,
            },
        )
        t0 = time.perf_counter()
        shutil.rmtree(work / f"run-{name}", ignore_errors=True)  # a fresh run each time
        trainer = Trainer(config, work / f"run-{name}", out=io.StringIO())
        trainer.train()
        nats = trainer.evaluate()
        corpus = open_prepared(folder, verify=False)
        ratio = len(corpus.val) / corpus.val_bytes
        bits = nats * ratio / math.log(2)
        print(
            f"  {name:<9} {config.vocab_size:>6} {per_step:>11.3g} {steps:>6} {nats:>12.4f} "
            f"{ratio:>8.3f} {bits:>9.4f} {time.perf_counter() - t0:>8.0f}"
        )
        sys.stdout.flush()


def main() -> None:
    """Runs both parts and prints them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="moe-tiny")
    parser.add_argument("--budget-steps", type=int, default=300)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="keep prepared data here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="moecore-prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folders = {
        "bytes": work / "bytes",
        "bpe-4096": work / "bpe-4096",
        "bpe-32000": work / "bpe-32000",
    }
    for name, folder in folders.items():
        if not (folder / "index.json").is_file():
            t0 = time.perf_counter()
            vocab = None if name == "bytes" else int(name.split("-")[1])
            prepare(["builtin"], folder, train_vocab=vocab, workers=2, log=io.StringIO())
            print(f"prepared {name} in {time.perf_counter() - t0:.0f} s (BPE training included)")
    if not args.skip_speed:
        prepare_speed(work, folders["bpe-4096"] / "tokenizer.json", args.rounds)
    if not args.skip_train:
        equal_flops(work, folders, args.preset, args.budget_steps)
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
