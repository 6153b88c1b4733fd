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

    @classmethod
    def from_run(cls, run: Any) -> ModelConfig:
        """The model part of a run configuration (any object with these attributes)."""
        return cls(**{f.name: getattr(run, f.name) for f in fields(cls)})

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` has an MoE FFN (else a dense one)."""
        return i >= self.first_dense_layers and (i - self.first_dense_layers) % self.moe_every == 0
