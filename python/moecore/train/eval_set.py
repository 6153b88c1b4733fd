"""The fixed validation set of issue 29, shared with the reference implementation: the last
``n // 20`` tokens of the corpus, ``n_windows`` windows of ``seq_len + 1`` tokens at evenly
strided offsets, scored as the mean over batches of the batch-mean cross-entropy."""

from __future__ import annotations

from typing import Any

import numpy as np

import moecore
from moecore.data import windows


def window_offsets(n_val: int, n_windows: int, seq_len: int) -> np.ndarray:
    """Offsets ``j · ((n_val − seq_len − 1) // (n_windows − 1))`` for j = 0 … n_windows − 1."""
    span = seq_len + 1
    if n_windows < 1:
        raise ValueError(f"the number of windows must be ≥ 1, got {n_windows}")
    if n_val < span:
        raise ValueError(f"the validation part has {n_val} tokens, fewer than a window ({span})")
    stride = (n_val - span) // (n_windows - 1) if n_windows > 1 else 0
    return np.arange(n_windows, dtype=np.int64) * stride


def eval_batches(
    tokens: np.ndarray, n_windows: int, seq_len: int, batch_size: int = 16
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input, target) batches of the set: windows of the last ``len(tokens) // 20`` tokens,
    ``batch_size`` windows a batch (the last batch may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    val = tokens[len(tokens) - len(tokens) // 20 :]
    starts = window_offsets(len(val), n_windows, seq_len)
    return [
        windows(val, starts[i : i + batch_size], seq_len) for i in range(0, len(starts), batch_size)
    ]


def evaluate_windows(model: Any, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over ``batches`` of the model's batch-mean cross-entropy (eval mode, no graph)."""
    was_training = model.training
    model.eval()
    try:
        with moecore.no_grad():
            losses = [model(x, y).item() for x, y in batches]
    finally:
        model.train(was_training)
    return float(np.mean(losses))
