"""The model's own configuration (the model-related subset of a run configuration)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ModelConfig:
    """Shape and options of a :class:`MoETransformer` (defaults: the ``moe-small`` preset)."""

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 512
    dense_d_ff: int = 1024
    activation: str = "gelu"
    score: str = "softmax"
    capacity_factor: float = 0.0
    aux_loss: float = 0.01
    z_loss: float = 0.0
    bias_update_rate: float = 0.0
    n_shared_experts: int = 0
    moe_every: int = 1
    first_dense_layers: int = 0
    norm: str = "layernorm"
    position: str = "learned"
    dropout: float = 0.0
    activation_checkpointing: bool = False
    # "gpt2": N(0, 0.02²) weights, residual projections 0.02/sqrt(2·n_layers), zero biases;
    # "torch": PyTorch's fan-in uniform (see docs/recipe.md)
    init: str = "gpt2"
    # biases on the attention's qkv and output projections and on each expert's two matrices
    bias: bool = False
    # DeepSeek-V3 (docs/deepseek.md). Fine-grained experts: each of the n_experts split
    # expert_split (m) ways, so n_experts·m routed experts of width d_ff/m, top_k·m per token;
    # each shared expert is one fine-grained expert (width d_ff/m)
    expert_split: int = 1
    # factor on the routed experts' weighted sum (V3: 2.5 with sigmoid scores)
    routed_scale: float = 1.0
    # α of the complementary sequence-wise balance loss (V3: 1e-4)
    seq_aux_loss: float = 0.0
    # node-limited routing: the routed experts in n_groups contiguous groups (with ep > 1
    # a multiple of ep, so a group never spans two ranks), each token's experts in at most
    # topk_groups of them (so on at most topk_groups ranks); 0 = off
    n_groups: int = 0
    topk_groups: int = 0
    # "mha" (packed multi-head) or "mla" (multi-head latent attention): latent width
    # kv_lora_rank, query latent q_lora_rank (0: a plain query projection), decoupled RoPE
    # key of rope_head_dim shared across heads
    attention: str = "mha"
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    rope_head_dim: int = 0
    # "none" or "dao": g = sigmoid(Linear(d_model → 1)(x)) scales each query's logits
    attention_gate: str = "none"
    # multi-token prediction: mtp_depth sequential modules, their mean loss weighted by
    # mtp_weight (λ) and added to the training loss (never to the validation loss)
    mtp_depth: int = 0
    mtp_weight: float = 0.3

    @classmethod
    def from_run(cls, run: Any) -> ModelConfig:
        """The model part of a run configuration (any object with these attributes)."""
        return cls(**{f.name: getattr(run, f.name) for f in fields(cls)})

    def routed_experts(self) -> tuple[int, int, int]:
        """``(experts, top_k, d_ff)`` of each MoE layer's routed experts once every expert
        is split ``expert_split`` ways (DeepSeekMoE's fine-grained experts)."""
        m = self.expert_split
        return self.n_experts * m, self.top_k * m, self.d_ff // m

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` has an MoE FFN (else a dense one)."""
        return i >= self.first_dense_layers and (i - self.first_dense_layers) % self.moe_every == 0
