"""The basic layers: Linear, Embedding, LayerNorm, RMSNorm, Dropout."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import ops
from moecore.autograd.tensor import Tensor
from moecore.nn import init as initializers
from moecore.nn.module import Module
from moecore.nn.parameter import Parameter


class Linear(Module):
    """``y = x Wᵀ + b``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        init: ``"gpt2"`` (weight N(0, std²), bias zero) or ``"torch"`` (PyTorch's
            U(±1/sqrt(in_features)) for both).
        std: the weight's standard deviation under ``"gpt2"``.

    Shape:
        input ``[..., in_features]`` → output ``[..., out_features]``.

    Examples:
        >>> layer = Linear(4, 2)
        >>> layer(moecore.randn(3, 4)).shape
        (3, 2)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: Any = np.float32,
        init: str = "gpt2",
        std: float = initializers.GPT2_STD,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, in_features)
        self.weight = Parameter(initializers.weight(shape, in_features, init, std, dtype))
        bias_param = (
            Parameter(initializers.bias((out_features,), in_features, init, dtype))
            if bias
            else None
        )
        self.register_parameter("bias", bias_param)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the affine map to the last axis of ``x``."""
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"


class Embedding(Module):
    """A lookup table of ``num_embeddings`` vectors of size ``embedding_dim``.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: vector size.
        std: standard deviation of the normal initialisation; by default 0.02 under
            ``init="gpt2"``, 1.0 (PyTorch's) under ``init="torch"``.
        init: ``"gpt2"`` or ``"torch"``.

    Shape:
        integer ids ``[...]`` → ``[..., embedding_dim]``.

    Examples:
        >>> Embedding(10, 3)(np.array([[1, 2]])).shape
        (1, 2, 3)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        std: float | None = None,
        dtype: Any = np.float32,
        init: str = "gpt2",
    ) -> None:
        super().__init__()
        initializers.check_init(init)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if std is None:
            std = initializers.GPT2_STD if init == "gpt2" else 1.0
        self.weight = Parameter(initializers.normal((num_embeddings, embedding_dim), std, dtype))

    def forward(self, ids: Any) -> Tensor:
        """Rows of the table at ``ids``."""
        return ops.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Layer normalisation over the last axis, with a learned scale and shift.

    Args:
        normalized_shape: size of the last axis.
        eps: added to the variance for stability.
        elementwise_affine: learn ``weight`` and ``bias``.

    Shape:
        ``[..., normalized_shape]`` → same.

    Examples:
        >>> LayerNorm(8)(moecore.randn(2, 8)).shape
        (2, 8)
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        self.normalized_shape, self.eps = normalized_shape, eps
        if elementwise_affine:
            self.weight = Parameter(np.ones(normalized_shape, dtype))
            self.bias = Parameter(np.zeros(normalized_shape, dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        """Normalises the last axis of ``x``."""
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class RMSNorm(Module):
    """Root-mean-square normalisation over the last axis, with a learned scale.

    Args:
        normalized_shape: size of the last axis.
        eps: added to the mean square for stability.

    Shape:
        ``[..., normalized_shape]`` → same.

    Examples:
        >>> RMSNorm(8)(moecore.randn(2, 8)).shape
        (2, 8)
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, dtype: Any = np.float32) -> None:
        super().__init__()
        self.normalized_shape, self.eps = normalized_shape, eps
        self.weight = Parameter(np.ones(normalized_shape, dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Normalises the last axis of ``x``."""
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Zeroes activations with probability ``p`` in training (scaling the rest by 1/(1-p)).

    Args:
        p: drop probability in [0, 1).

    Shape:
        any → same.

    Examples:
        >>> Dropout(0.1).eval()(moecore.ones(3)).tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Applies dropout when training."""
        return ops.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
