"""Batches of (input, target) windows: random for training, fixed for validation.

A training batch depends only on (seed, step, micro-batch), never on what came before, so a
resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import numpy as np


def train_batch(
    tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int, micro: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random windows of ``seq_len + 1`` tokens → (inputs, targets) int64."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return windows(tokens, starts, seq_len)


def val_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_batches`` fixed batches of windows spread evenly over ``tokens``."""
    count = max(1, n_batches * batch_size)
    starts = np.linspace(0, len(tokens) - seq_len - 1, num=count).astype(np.int64)
    return [
        windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, count, batch_size)
    ]


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``tokens[s : s+seq_len]`` and targets shifted by one, for each start ``s``."""
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]
    block = tokens[index].astype(np.int64)
    return block[:, :-1], block[:, 1:]
