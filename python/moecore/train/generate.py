"""Sampling text from a trained model: full recompute, a latent KV cache for MLA models,
and greedy speculative decoding with the model's multi-token prediction modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import moecore
from moecore import ops
from moecore.models import MoETransformer
from moecore.models.decoding import LatentDecoder, has_latent_cache
from moecore.models.mtp import mtp_drafts


def generate(
    model: MoETransformer,
    prompt: bytes,
    tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    speculative: bool = False,
    stats: dict[str, Any] | None = None,
) -> bytes:
    """Continues ``prompt`` by ``tokens`` bytes, sampling from the model's softmax at
    ``temperature`` (0 = greedy), optionally among the ``top_k`` most likely tokens."""
    outside = sorted({b for b in prompt if b >= model.config.vocab_size})
    if outside:
        raise ValueError(
            f"the prompt has bytes {outside[:8]} outside the model's vocabulary of "
            f"{model.config.vocab_size} tokens (ids 0-{model.config.vocab_size - 1})"
        )
    ids = generate_ids(model, list(prompt), tokens, temperature, top_k, seed, speculative, stats)
    return bytes(i if i < 256 else 63 for i in ids)


def generate_ids(
    model: MoETransformer,
    prompt: list[int],
    tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    speculative: bool = False,
    stats: dict[str, Any] | None = None,
) -> list[int]:
    """The ``tokens`` ids sampled after ``prompt`` (token ids; empty: the model starts from
    id 10, a newline byte, which is returned first), at ``temperature`` (0 = greedy),
    optionally among the ``top_k`` most likely.

    An MLA model decodes from its latent cache. ``speculative`` (greedy only, a model with
    MTP modules): the MTP modules draft the next tokens, one forward of the main model
    verifies them; the output equals greedy decoding, and ``stats`` (a dict, if given)
    receives ``drafted``, ``accepted``, ``accept_rate`` and ``forwards``."""
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
    if speculative and (temperature != 0 or not model.config.mtp_depth):
        raise ValueError(
            "speculative decoding is greedy (temperature 0) and needs a model with MTP "
            f"modules (mtp_depth ≥ 1); got temperature {temperature}, "
            f"mtp_depth {model.config.mtp_depth}"
        )
    rng = np.random.default_rng(seed)
    ids = list(prompt) or [10]
    start = len(prompt)
    model.eval()
    if speculative:
        with moecore.no_grad():
            _speculative(model, ids, tokens, {} if stats is None else stats)
        return ids[start:]
    next_logits = _next_logits(model)
    with moecore.no_grad():
        for _ in range(tokens):
            logits = next_logits(ids).astype(np.float64)
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


def _next_logits(model: MoETransformer) -> Callable[[list[int]], np.ndarray]:
    """``f(ids)``: the logits after ``ids`` given the last ``seq_len`` of them — a full
    forward each time, or for MLA models the latent cache (fed only the new token while
    the window has room, rebuilt from the window when it slides)."""
    window = model.config.seq_len
    if not has_latent_cache(model):
        return lambda ids: model(np.array([ids[-window:]], dtype=np.int64)).data[0, -1]
    state = {"decoder": LatentDecoder(model), "fed": 0}

    def cached(ids: list[int]) -> np.ndarray:
        decoder = state["decoder"]
        fed = state["fed"]
        assert isinstance(decoder, LatentDecoder) and isinstance(fed, int)
        if len(ids) > window:
            decoder = state["decoder"] = LatentDecoder(model)
            fed, ids = 0, ids[-window:]
        logits = decoder.step(np.array([ids[fed:]], dtype=np.int64))
        state["fed"] = len(ids)
        return logits[0, -1]

    return cached


def _speculative(model: MoETransformer, ids: list[int], tokens: int, stats: dict) -> None:
    """Greedy decoding of ``tokens`` more ids onto ``ids`` (in place) with MTP drafts: each
    round one forward over the confirmed ids plus the drafts; drafts are accepted while
    they equal the main model's greedy choice, and the first disagreement (or the token
    after the last draft) comes free from the same forward."""
    window, depth = model.config.seq_len, model.config.mtp_depth
    drafts: list[int] = []
    target = len(ids) + tokens
    drafted = accepted = forwards = 0
    while len(ids) < target:
        if len(ids) + len(drafts) > window:
            drafts = []  # no room: a plain greedy step on the last window
        whole = len(ids) + len(drafts) <= window  # the context starts at position 0
        context = (ids + drafts)[-window:]
        h = model.hidden_states(np.array([context], dtype=np.int64))
        first = len(context) - len(drafts) - 1  # the position predicting the next id
        logits = ops.linear(model.norm(h[:, first:]), model.tok_emb.weight).data[0]
        greedy = [int(i) for i in np.argmax(logits, axis=-1)]
        n_ok = 0
        while n_ok < len(drafts) and drafts[n_ok] == greedy[n_ok]:
            n_ok += 1
        drafted += len(drafts)
        accepted += n_ok
        forwards += 1
        ids.extend(([*drafts[:n_ok], greedy[n_ok]])[: target - len(ids)])
        drafts = []
        if whole and len(ids) < target and len(ids) + depth <= window:
            # The MTP modules read the main model's states up to the second-to-last
            # confirmed id: positions 0 … first + n_ok of this forward.
            drafts = mtp_drafts(model, h[:, : first + 1 + n_ok], ids)
    stats.update(
        drafted=drafted,
        accepted=accepted,
        accept_rate=accepted / drafted if drafted else 0.0,
        forwards=forwards,
    )
