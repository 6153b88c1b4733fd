"""``moecore export``: a checkpoint's model weights in one safetensors file of the
single-process layout, whether every rank wrote its own part (ZeRO) or rank 0 wrote all."""

from __future__ import annotations

import io
from pathlib import Path

from moecore.train import checkpoint, safetensors

__all__ = ["export"]


def export(source: Path, out: Path) -> Path:
    """Writes the model tensors of ``source`` (a run: its newest intact checkpoint; or a
    checkpoint folder, verified against its manifest) to ``out`` atomically; returns the
    checkpoint used. A damaged or incomplete checkpoint raises
    :class:`moecore.errors.CheckpointError` and ``out`` is left as it was."""
    source = Path(source)
    if (source / "state.json").is_file():
        used = source
        groups, state = checkpoint.load(source)
    else:
        used, groups, state, _ = checkpoint.newest_intact(source)
    buffer = io.BytesIO()
    meta = {"format": "pt", "step": str(state["step"])}
    safetensors.write(buffer, groups["model"], meta)
    checkpoint.write_atomic(Path(out), buffer.getvalue())
    return used
