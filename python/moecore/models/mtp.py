"""Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules that each predict one
more token ahead, sharing the model's embedding and output head."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import nn, ops
from moecore.autograd.tensor import Tensor
from moecore.models.config import ModelConfig


class MTPModule(nn.Module):
    """Depth k of multi-token prediction: ``h^k_i = block(M_k [norm(h^{k-1}_i);
    norm(Emb(t_{i+k}))])``, whose logits (through its own final norm and the shared head)
    predict token ``t_{i+k+1}``.

    Args:
        config: the model's configuration (width, norm, init).
        block: the module's transformer block (the model builds one like its own).
    """

    #: ZeRO stage 3 gathers this module's parameters with the root's (from the start of
    #: forward to its end, and through backward), not around its own forward: the MTP loss
    #: applies :attr:`norm` to the forward's output afterwards.
    gathered_with_root = True

    def __init__(self, config: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        norm = nn.LayerNorm if config.norm == "layernorm" else nn.RMSNorm
        d = config.d_model
        self.hidden_norm = norm(d)
        self.embed_norm = norm(d)
        self.proj = nn.Linear(2 * d, d, bias=False, init=config.init)
        self.block = block
        self.norm = norm(d)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """The next depth's representations from ``h [B, T, d]`` and the embeddings of the
        tokens ``k`` ahead ``emb [B, T, d]``."""
        joined = ops.concat([self.hidden_norm(h), self.embed_norm(emb)], axis=-1)
        return self.block(self.proj(joined))


def mtp_losses(model: Any, h: Tensor, ids: np.ndarray, targets: np.ndarray) -> list[Tensor]:
    """The cross-entropy of each MTP depth k = 1..D on a batch: position i (of the ``T − k``
    that have a target) predicts ``targets[:, i + k]`` from ``h^{k−1}_i`` and the embedding
    of ``ids[:, i + k]``; ``h`` is the main model's last hidden states."""
    out = []
    t = ids.shape[1]
    for k, module in enumerate(model.mtp, start=1):
        if t - k < 1:
            break
        h = module(h[:, : t - k], model.tok_emb(ids[:, k:]))
        logits = ops.linear(module.norm(h), model.tok_emb.weight)
        out.append(ops.cross_entropy(logits, targets[:, k:]))
    return out


def mtp_drafts(model: Any, h: Tensor, ids: list[int]) -> list[int]:
    """Greedy drafts of the D tokens after ``ids`` from the main model's hidden states ``h
    [1, len(ids) − 1, d]`` (positions up to the second-to-last confirmed token): depth k at
    the last position sees ``Emb(t_{i+k})`` — the last confirmed token, then the drafts."""
    ext = list(ids)
    n = h.shape[1]
    for k, module in enumerate(model.mtp, start=1):
        window = np.asarray([ext[k : k + n]], dtype=np.int64)
        h = module(h, model.tok_emb(window))
        logits = ops.linear(module.norm(h[:, -1:]), model.tok_emb.weight)
        ext.append(int(np.argmax(logits.data[0, -1])))
    return ext[len(ids) :]
