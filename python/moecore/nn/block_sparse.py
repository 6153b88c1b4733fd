"""``BlockSparseLinear``: a linear layer whose weight keeps only some B×B blocks, with
gradual magnitude pruning of blocks on a schedule."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore.autograd.random import generator
from moecore.autograd.tensor import Tensor
from moecore.nn import init
from moecore.nn.module import Module
from moecore.nn.parameter import Parameter
from moecore.ops.block_sparse import block_sparse_linear
from moecore.sparse import BsrMatrix


def cubic_density(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's gradual pruning schedule: ``initial`` until ``start``, then a cubic
    decrease reaching ``final`` at ``end``."""
    if step <= start or end <= start:
        return initial if step <= start and end > start else final
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


class BlockSparseLinear(Module):
    """``y = x Wᵀ + b`` with ``W`` ``[out_features, in_features]`` stored as ``block``×``block``
    blocks (BSR); forward and both backward products touch only the kept blocks.

    Args:
        in_features, out_features: multiples of ``block``.
        block: 8, 16, 32 or 64.
        density: fraction of blocks kept at the end of pruning.
        bias: learn an additive bias.
        initial_density: fraction kept at the start (1.0 = dense); blocks are then pruned by
            magnitude (Frobenius norm) from ``prune_start`` to ``prune_end`` along the cubic
            schedule of Zhu & Gupta, each time :meth:`prune` is called. When equal to
            ``density`` (the default) the pattern is random and fixed.
        seed: pattern seed (default: drawn from the default generator).

    Shape:
        ``[..., in_features]`` → ``[..., out_features]``.

    Examples:
        >>> layer = BlockSparseLinear(64, 64, block=16, density=0.25)
        >>> layer(moecore.randn(3, 64)).shape
        (3, 64)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: int = 16,
        density: float = 0.0625,
        bias: bool = True,
        initial_density: float | None = None,
        prune_start: int = 0,
        prune_end: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        initial = density if initial_density is None else initial_density
        if not 0.0 < density <= initial <= 1.0:
            raise ValueError(f"need 0 < density ≤ initial_density ≤ 1, got {density} and {initial}")
        if seed is None:
            seed = int(generator("cpu").integers(2**31))
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.density, self.initial_density = density, initial
        self.prune_start, self.prune_end = prune_start, prune_end
        w = BsrMatrix.random((out_features, in_features), block, initial, seed=seed)
        # Scale like nn.Linear's default for the inputs each output really sees.
        bound = 1.0 / math.sqrt(max(1.0, initial * in_features))
        w.data[...] = np.random.default_rng(seed + 1).uniform(-bound, bound, w.data.shape)
        self._matrix = w
        self.weight = Parameter(w.data)
        self.register_parameter(
            "bias", Parameter(init.uniform((out_features,), bound)) if bias else None
        )

    @property
    def matrix(self) -> BsrMatrix:
        """The weight as a :class:`moecore.sparse.BsrMatrix` (sharing the parameter's data)."""
        self._matrix.data = self.weight.data
        return self._matrix

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block-sparse affine map to the last axis."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BlockSparseLinear expects [..., {self.in_features}], got {x.shape}")
        return block_sparse_linear(x, self.weight, self.matrix, self.bias)

    def prune(self, step: int, optimizer: Any = None) -> int:
        """Drops the smallest blocks down to the schedule's density at ``step``; returns the
        number of blocks kept. The optimizer's per-parameter state follows the kept blocks."""
        total = (self.out_features // self.block) * (self.in_features // self.block)
        target = cubic_density(
            step, self.initial_density, self.density, self.prune_start, self.prune_end
        )
        keep_count = max(1, round(target * total))
        w = self.matrix
        if keep_count >= w.nnzb:
            return w.nnzb
        norms = np.sqrt((w.data.astype(np.float64) ** 2).sum(axis=(1, 2)))
        keep = np.sort(np.argsort(-norms, kind="stable")[:keep_count])
        rows = np.repeat(np.arange(len(w.indptr) - 1), np.diff(w.indptr))[keep]
        indptr = np.zeros(len(w.indptr), np.int64)
        np.cumsum(np.bincount(rows, minlength=len(w.indptr) - 1), out=indptr[1:])
        data = np.ascontiguousarray(w.data[keep])
        self._matrix = BsrMatrix(w.shape, w.block, indptr, w.indices[keep], data)
        self.weight.data = data
        self.weight.grad = None
        if optimizer is not None:
            optimizer.reindex_state(self.weight, keep)
        return keep_count

    def state_dict_pattern(self) -> dict[str, np.ndarray]:
        """The current pattern (indptr, indices), for saving alongside the weights."""
        return {"indptr": self._matrix.indptr, "indices": self._matrix.indices}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
            f"density={self._matrix.density:.4f}"
        )
