"""Sampling text from a trained model."""

from __future__ import annotations

import numpy as np

import moecore
from moecore.models import MoETransformer


def generate(
    model: MoETransformer,
    prompt: bytes,
    tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> bytes:
    """Continues ``prompt`` by ``tokens`` bytes, sampling from the model's softmax at
    ``temperature`` (0 = greedy), optionally among the ``top_k`` most likely tokens."""
    outside = sorted({b for b in prompt if b >= model.config.vocab_size})
    if outside:
        raise ValueError(
            f"the prompt has bytes {outside[:8]} outside the model's vocabulary of "
            f"{model.config.vocab_size} tokens (ids 0-{model.config.vocab_size - 1})"
        )
    ids = generate_ids(model, list(prompt), tokens, temperature, top_k, seed)
    return bytes(i if i < 256 else 63 for i in ids)


def generate_ids(
    model: MoETransformer,
    prompt: list[int],
    tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """The ``tokens`` ids sampled after ``prompt`` (token ids; empty: the model starts from
    id 10, a newline byte, which is returned first), at ``temperature`` (0 = greedy),
    optionally among the ``top_k`` most likely."""
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    if tokens < 0:
        raise ValueError(f"tokens must be ≥ 0, got {tokens}")
    if not np.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number, got {temperature}")
    outside = sorted({i for i in prompt if not 0 <= i < model.config.vocab_size})
    if outside:
        raise ValueError(
            f"the prompt has token ids {outside[:8]} outside the model's vocabulary "
            f"(ids 0-{model.config.vocab_size - 1})"
        )
    rng = np.random.default_rng(seed)
    ids = list(prompt) or [10]
    start = len(prompt)
    window = model.config.seq_len
    model.eval()
    with moecore.no_grad():
        for _ in range(tokens):
            context = np.array([ids[-window:]], dtype=np.int64)
            logits = model(context).data[0, -1].astype(np.float64)
            if temperature == 0:
                ids.append(int(np.argmax(logits)))
                continue
            logits = logits / temperature
            if top_k is not None and top_k < logits.size:
                cut = np.partition(logits, -top_k)[-top_k]
                logits = np.where(logits >= cut, logits, -np.inf)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            ids.append(int(rng.choice(p.size, p=p)))
    return ids[start:]
