"""The DeepSeek-V3 family's figures for docs/deepseek.md.

- parameters: total and active per token of ``deepseek-small``, ``deepseek-tiny`` and
  ``moe-small`` (active: everything but the routed experts, plus top-k of them; the MTP
  modules counted apart);
- the KV cache per token: MLA's latent cache (measured on a decoder) against multi-head
  attention of the same width;
- ``--budget-steps N``: ``moe-small`` for N steps and ``deepseek-small`` for the same
  training FLOPs, each scored on the fixed validation set (64 windows, train/eval_set.py),
  with their tokens/s and, for deepseek-small, the MTP accepted-draft rate of greedy
  speculative decoding from a few prompts;
- ``--dao-steps N``: ``--dao-preset`` (default ``deepseek-tiny``, multi-head and MLA) for
  N steps without and with the DAO attention gate, interleaved: its cost in tokens/s and its
  effect on the validation loss.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/deepseek.py
--budget-steps 60``. Tokens/s in lock-step: ``benches/py/train_ab.py --preset moe-small
--candidate-preset deepseek-small``.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import moecore as mc
from moecore.models.decoding import LatentDecoder
from moecore.train.config import build_config
from moecore.train.eval_set import eval_batches, evaluate_windows
from moecore.train.generate import generate_ids
from moecore.train.trainer import Trainer, build_model


def parameter_counts(config: Any) -> dict[str, int]:
    """``total``, ``active`` (per token, the main model) and ``mtp`` (the MTP modules,
    active part) learnable scalars; the tied output layer counted once."""
    model = build_model(config)
    modules = dict(model.named_modules())
    counts = {"total": 0, "active": 0, "mtp": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        active = p.numel()
        if name.endswith((".w1", ".w2", ".b1", ".b2")):
            layer = modules[name.rsplit(".", 1)[0]]
            active = p.numel() * layer.top_k // layer.n_experts
        counts["mtp" if name.startswith("mtp.") else "active"] += active
    return counts


def flops_per_token(config: Any) -> float:
    """Training FLOPs per token: 6 per active matrix weight (the tied output layer and the
    MTP modules included) plus attention's 6 · layers · seq_len · (qk + v width)."""
    counts = parameter_counts(config)
    active = counts["active"] + counts["mtp"]
    d, layers = config.d_model, config.n_layers + config.mtp_depth
    qk = d + config.n_heads * config.rope_head_dim if config.attention == "mla" else d
    return 6 * active + 6 * layers * config.seq_len * (qk + d)


def cache_bytes_per_token(config: Any) -> tuple[float, float]:
    """(MLA latent cache measured on 32 positions, multi-head K and V of the same width)."""
    model = build_model(config)
    model.eval()
    decoder = LatentDecoder(model)
    decoder.step(np.zeros((1, 32), np.int64))
    return decoder.cache_bytes() / 32, config.n_layers * 2 * config.d_model * 4.0


def train_and_score(preset: str, steps: int, work: Path, sets: dict[str, Any]) -> dict[str, Any]:
    """Trains ``preset`` for ``steps`` and scores it on the fixed validation set."""
    config = build_config(
        preset,
        overrides={
            "steps": steps,
            "decay_steps": steps,
            "warmup_steps": max(1, min(50, steps // 10)),
            "eval_every": 0,
            "checkpoint_every": 0,
            **sets,
        },
    )
    name = "-".join([preset, str(steps), *map(str, sets.values())])
    trainer = Trainer(config, work / name, out=io.StringIO())
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = steps * config.batch_size * config.grad_accum * config.seq_len
    batches = eval_batches(trainer.corpus.tokens, 64, config.seq_len)
    return {
        "trainer": trainer,
        "val": evaluate_windows(trainer.model, batches),
        "tok/s": tokens / seconds,
        "seconds": seconds,
    }


def accept_rate(model: Any, prompts: list[bytes], tokens: int) -> tuple[int, int]:
    """(accepted, drafted) over greedy speculative decoding of ``tokens`` after each prompt."""
    accepted = drafted = 0
    for prompt in prompts:
        stats: dict[str, Any] = {}
        generate_ids(model, list(prompt), tokens, temperature=0, speculative=True, stats=stats)
        accepted += stats["accepted"]
        drafted += stats["drafted"]
    return accepted, drafted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-steps", type=int, default=0, help="moe-small steps (0: skip)")
    ap.add_argument("--dao-steps", type=int, default=0, help="gate on/off runs (0: skip)")
    ap.add_argument("--dao-preset", default="deepseek-tiny")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    for preset in ("moe-small", "deepseek-small", "deepseek-tiny"):
        config = build_config(preset)
        c = parameter_counts(config)
        print(
            f"{preset:<15} total {c['total']:>11,}  active/token {c['active']:>10,}  "
            f"MTP {c['mtp']:>9,}  training FLOPs/token {flops_per_token(config):.3g}"
        )
    ds = build_config("deepseek-small")
    mla, mha = cache_bytes_per_token(ds)
    print(
        f"KV cache per token (float32, {ds.n_layers} layers): MLA {mla:,.0f} B "
        f"(kv_lora_rank {ds.kv_lora_rank} + rope_head_dim {ds.rope_head_dim}), "
        f"MHA of width {ds.d_model}: {mha:,.0f} B — {mha / mla:.2f}× less"
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="deepseek-bench-"))
    if args.budget_steps:
        base = build_config("moe-small")
        budget = flops_per_token(base) * args.budget_steps
        ds_steps = max(1, round(budget / flops_per_token(ds)))
        for preset, steps in (("moe-small", args.budget_steps), ("deepseek-small", ds_steps)):
            mc.manual_seed(0)
            r = train_and_score(preset, steps, work, {})
            line = (
                f"{preset:<15} {steps:>5} steps  val {r['val']:.4f} (64 windows)  "
                f"{r['tok/s']:,.0f} tok/s  {r['seconds']:.0f} s"
            )
            if preset == "deepseek-small":
                ok, drafted = accept_rate(r["trainer"].model, [b"def ", b"import ", b"class "], 64)
                line += f"  MTP accepted {ok}/{drafted} = {ok / max(drafted, 1):.3f}"
            print(line, flush=True)
    for attention in ("mha", "mla") if args.dao_steps else ():
        for gate in ("none", "dao"):
            mc.manual_seed(0)
            sets = {"attention": attention, "attention_gate": gate}
            r = train_and_score(args.dao_preset, args.dao_steps, work, sets)
            print(
                f"{args.dao_preset} {attention} gate {gate:<4} {args.dao_steps} steps  "
                f"val {r['val']:.4f} (64 windows)  {r['tok/s']:,.0f} tok/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
