"""Incremental decoding with a KV cache: for MLA models, one :class:`LatentCache` per block
(the latent and the RoPE key only, the up-projections absorbed)."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import ops
from moecore.autograd.grad_mode import no_grad
from moecore.autograd.tensor import Tensor
from moecore.nn.mla import LatentCache, MultiHeadLatentAttention


def has_latent_cache(model: Any) -> bool:
    """Whether every attention layer of ``model`` is MLA (so :class:`LatentDecoder` fits)."""
    return all(isinstance(b.attn, MultiHeadLatentAttention) for b in model.blocks)


class LatentDecoder:
    """Logits of new tokens given the ones already fed, from per-block latent caches: the
    same numbers as the full forward over the whole sequence, without recomputing it.
    The model must be in eval mode (dropout off)."""

    def __init__(self, model: Any) -> None:
        if not has_latent_cache(model):
            raise ValueError("LatentDecoder needs a model whose attention is MLA")
        self.model = model
        self.caches = [LatentCache() for _ in model.blocks]

    def __len__(self) -> int:
        return len(self.caches[0])

    def cache_bytes(self) -> int:
        """Bytes the caches hold (every layer)."""
        return sum(c.nbytes() for c in self.caches)

    def step(self, ids: Any) -> np.ndarray:
        """Logits ``[B, n, vocab]`` of the new tokens ``ids [B, n]`` (their positions follow
        the cached ones); appends them to the caches."""
        m = self.model
        ids = np.asarray(ids, dtype=np.int64)
        start = len(self)
        if start + ids.shape[1] > m.config.seq_len:
            raise ValueError(
                f"{start + ids.shape[1]} positions exceed the model's seq_len {m.config.seq_len}"
            )
        with no_grad():
            x = m.tok_emb(ids)
            if m.config.position == "learned":
                x = x + m.pos_emb[start : start + ids.shape[1]]
            for block, cache in zip(m.blocks, self.caches):
                x = x + Tensor(block.attn.decode(block.norm1(x).data, cache))
                x = x + block.ffn(block.norm2(x))
            return ops.linear(m.norm(x), m.tok_emb.weight).data
