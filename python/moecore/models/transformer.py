"""``MoETransformer``: a decoder-only language model with MoE feed-forward layers."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import nn, ops
from moecore.autograd.tensor import Tensor
from moecore.models.config import ModelConfig
from moecore.models.mtp import MTPModule, mtp_losses
from moecore.nn import init


class DenseFFN(nn.Module):
    """The dense feed-forward block: Linear → activation → Linear (no biases)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str,
        init: str = "gpt2",
        out_std: float = nn.init.GPT2_STD,
    ) -> None:
        super().__init__()
        gate = 2 if activation == "swiglu" else 1
        self.activation = activation
        self.up = nn.Linear(d_model, gate * d_ff, bias=False, init=init)
        self.down = nn.Linear(d_ff, d_model, bias=False, init=init, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block to the last axis."""
        h = self.up(x)
        if self.activation == "swiglu":
            h = ops.swiglu(h)
        elif self.activation == "gelu":
            h = ops.gelu(h)
        else:
            h = h.relu()
        return self.down(h)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, cfg: ModelConfig, moe: bool) -> None:
        super().__init__()
        norm = nn.LayerNorm if cfg.norm == "layernorm" else nn.RMSNorm
        out_std = init.residual_std(cfg.n_layers)
        self.norm1 = norm(cfg.d_model)
        gate = None if cfg.attention_gate == "none" else cfg.attention_gate
        if cfg.attention == "mla":
            self.attn: nn.Module = nn.MultiHeadLatentAttention(
                cfg.d_model,
                cfg.n_heads,
                cfg.kv_lora_rank,
                q_lora_rank=cfg.q_lora_rank,
                rope_head_dim=cfg.rope_head_dim,
                max_len=cfg.seq_len,
                dropout=cfg.dropout,
                gate=gate,
                init=cfg.init,
                out_std=out_std,
            )
        else:
            self.attn = nn.Attention(
                cfg.d_model,
                cfg.n_heads,
                bias=cfg.bias,
                dropout=cfg.dropout,
                rope=cfg.position == "rope",
                max_len=cfg.seq_len,
                init=cfg.init,
                out_std=out_std,
                gate=gate,
            )
        self.norm2 = norm(cfg.d_model)
        if moe:
            n_experts, top_k, d_ff = cfg.routed_experts()
            self.ffn: nn.Module = nn.MoE(
                cfg.d_model,
                d_ff,
                n_experts,
                top_k=top_k,
                score=cfg.score,
                capacity_factor=cfg.capacity_factor or None,
                aux_loss=cfg.aux_loss,
                z_loss=cfg.z_loss,
                bias_update_rate=cfg.bias_update_rate,
                n_shared_experts=cfg.n_shared_experts,
                n_groups=cfg.n_groups or None,
                topk_groups=cfg.topk_groups or None,
                activation=cfg.activation,
                init=cfg.init,
                out_std=out_std,
                bias=cfg.bias,
                seq_aux_loss=cfg.seq_aux_loss,
                routed_scale=cfg.routed_scale,
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.dense_d_ff, cfg.activation, cfg.init, out_std)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """One block."""
        x = x + self.attn(self.norm1(x))
        return x + self.drop(self.ffn(self.norm2(x)))


class MoETransformer(nn.Module):
    """Decoder-only transformer: token (+ learned position) embeddings, ``n_layers`` pre-norm
    blocks with causal attention and MoE (or dense) FFNs, a final norm, and an output layer
    tied to the token embedding.

    Args:
        config: a :class:`ModelConfig`.

    Shape:
        token ids ``[batch, T]`` (T ≤ seq_len) → logits ``[batch, T, vocab_size]``; with
        ``targets`` the mean cross-entropy (a scalar Tensor).

    Examples:
        >>> model = MoETransformer(ModelConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16))
        >>> model(np.zeros((2, 16), np.int64)).shape
        (2, 16, 256)
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model, std=0.02)
        if config.position == "learned":
            self.pos_emb = nn.Parameter(init.normal((config.seq_len, config.d_model), 0.02))
        self.blocks = nn.ModuleList(
            Block(config, config.is_moe_layer(i)) for i in range(config.n_layers)
        )
        norm = nn.LayerNorm if config.norm == "layernorm" else nn.RMSNorm
        self.norm = norm(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        if config.mtp_depth:
            self.mtp = nn.ModuleList(
                MTPModule(config, Block(config, config.is_moe_layer(config.n_layers)))
                for _ in range(config.mtp_depth)
            )
        #: The multi-token prediction losses of the last training forward (one per depth).
        self.last_mtp_losses: list[float] = []

    def forward(self, ids: Any, targets: Any = None) -> Tensor:
        """Logits for every position, or the mean cross-entropy against ``targets`` (in
        training, plus ``mtp_weight`` × the mean multi-token prediction loss)."""
        ids = ids.data if isinstance(ids, Tensor) else np.asarray(ids)
        h = self.hidden_states(ids)
        if targets is None:
            return self.head(h)
        return self.head_loss(h, ids, np.asarray(targets))

    def head_loss(self, h: Tensor, ids: np.ndarray, targets: np.ndarray) -> Tensor:
        """The training loss from the last block's output ``h``: the mean cross-entropy
        against ``targets`` (in training, plus ``mtp_weight`` × the mean multi-token
        prediction loss, which also reads the input ``ids``)."""
        loss = self.head(h, targets)
        if self.config.mtp_depth and self.training:
            extra = mtp_losses(self, h, ids, targets)
            self.last_mtp_losses = [e.item() for e in extra]
            if extra:
                loss = loss + sum(extra[1:], extra[0]) * (self.config.mtp_weight / len(extra))
        return loss

    def hidden_states(self, ids: Any) -> Tensor:
        """The last block's output ``[batch, T, d_model]`` (before the final norm)."""
        return self.run_blocks(self.embed(ids), 0, len(self.blocks))

    # The parts of forward (embed, run_blocks, head_loss), which pipeline parallelism runs
    # on different ranks (the MTP modules with the head, on the last stage).
    def embed(self, ids: Any) -> Tensor:
        """Token (+ position) embeddings of ``ids [batch, T]``: the input of block 0."""
        ids = ids.data if isinstance(ids, Tensor) else np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] > self.config.seq_len:
            raise ValueError(f"ids must be [batch, T ≤ {self.config.seq_len}], got {ids.shape}")
        x = self.tok_emb(ids)
        if self.config.position == "learned":
            x = x + self.pos_emb[: ids.shape[1]]
        return self.drop(x)

    def run_blocks(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Blocks ``lo`` to ``hi − 1`` applied to ``x``."""
        for block in list(self.blocks)[lo:hi]:
            if self.config.activation_checkpointing and self.training:
                x = ops.checkpoint(block, x)
            else:
                x = block(x)
        return x

    def head(self, x: Tensor, targets: Any = None) -> Tensor:
        """Final norm and the tied output layer: logits, or the mean cross-entropy against
        ``targets``."""
        logits = ops.linear(self.norm(x), self.tok_emb.weight)
        if targets is None:
            return logits
        return ops.cross_entropy(logits, np.asarray(targets))

    def moe_layers(self) -> list[nn.MoE]:
        """The MoE layers, in depth order (the MTP modules' last)."""
        return [m for m in self.modules() if isinstance(m, nn.MoE)]

    def num_parameters(self) -> int:
        """Number of learnable scalars (the tied output layer counted once)."""
        return sum(p.numel() for p in self.parameters())
