"""Reports of a run: a text summary, and a PNG of the curves when matplotlib is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from moecore.train.metrics import read_metrics


def summarize(records: list[dict[str, Any]]) -> str:
    """A few lines: steps, first/last/best loss, validation losses, speed, expert load."""
    if not records:
        return "no metrics recorded yet"
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), float)]
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    speed = np.median([r["tokens_per_s"] for r in records if "tokens_per_s" in r])
    lines = [
        f"steps      {records[-1]['step']} ({sum(bool(r.get('skipped')) for r in records)} skipped, "
        f"{sum(bool(r.get('spike')) for r in records)} loss spikes)",
        f"loss       first {losses[0]:.4f}  last {losses[-1]:.4f}  best {min(losses):.4f}"
        if losses
        else "loss       -",
        "val loss   " + ("  ".join(f"{s}: {v:.4f}" for s, v in vals[-6:]) if vals else "-"),
        f"speed      {speed:,.0f} tokens/s (median)",
    ]
    loads = records[-1].get("expert_load") or []
    for i, load in enumerate(loads):
        lines.append(f"layer {i} load  {load}  cv {records[-1]['load_cv'][i]:.2f}")
    return "\n".join(lines)


def write_png(records: list[dict[str, Any]], path: Path) -> bool:
    """Plots loss, validation loss and expert-load CV per layer; False without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax1.plot(steps, [r["loss"] for r in records], label="train loss", lw=1)
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if vals:
        ax1.plot(*zip(*vals), "o-", label="val loss")
    ax1.set_ylabel("loss")
    ax1.legend()
    cvs = np.array([r.get("load_cv") or [0.0] for r in records])
    for i in range(cvs.shape[1]):
        ax2.plot(steps, cvs[:, i], label=f"layer {i}", lw=1)
    ax2.set_ylabel("expert load CV")
    ax2.set_xlabel("step")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(run_dir: Path) -> tuple[str, Path | None]:
    """(text summary, PNG path or None) for a run directory."""
    # Step records only (a resume past a damaged checkpoint adds an "event" record).
    records = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r]
    png = Path(run_dir) / "report.png"
    return summarize(records), (png if records and write_png(records, png) else None)
