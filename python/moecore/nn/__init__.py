"""Layers with PyTorch's ``nn.Module`` semantics."""

from __future__ import annotations

from moecore.nn import init
from moecore.nn.attention import Attention
from moecore.nn.block_sparse import BlockSparseLinear
from moecore.nn.containers import ModuleList, Sequential
from moecore.nn.layers import Dropout, Embedding, LayerNorm, Linear, RMSNorm
from moecore.nn.mla import LatentCache, MultiHeadLatentAttention
from moecore.nn.module import Module
from moecore.nn.moe import MoE, update_router_biases
from moecore.nn.parameter import Parameter

__all__ = [
    "Attention",
    "BlockSparseLinear",
    "Dropout",
    "Embedding",
    "LatentCache",
    "LayerNorm",
    "Linear",
    "MoE",
    "Module",
    "ModuleList",
    "MultiHeadLatentAttention",
    "Parameter",
    "RMSNorm",
    "Sequential",
    "init",
    "update_router_biases",
]
