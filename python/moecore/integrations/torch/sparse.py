"""A block-sparse linear layer as a ``torch.nn.Module`` over moecore's BSR kernels."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from moecore.integrations.torch._tensors import check_input, to_array, to_tensor
from moecore.sparse import BsrMatrix, bsr_linear, bsr_linear_dw, bsr_linear_dx

__all__ = ["BlockSparseLinear", "BsrLinearFunction"]


class BsrLinearFunction(torch.autograd.Function):
    """``y = x @ w.T (+ bias)`` with ``w`` block-sparse: ``apply(x, values, bias, matrix)``,
    ``values`` the kept blocks ``[nnzb, B, B]`` (whose memory ``matrix.data`` views), ``bias``
    ``[out_features]`` or None. Backward computes ``dx = dy @ w`` and the gradient of the kept
    blocks only (an SDDMM), never a dense weight gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        matrix: BsrMatrix,
    ) -> torch.Tensor:
        xa = to_array(x, "x")
        y = bsr_linear(xa, matrix, None if bias is None else to_array(bias, "bias"))
        ctx.save_for_backward(x)
        ctx.matrix = matrix
        return to_tensor(y)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        dy = to_array(grad.contiguous(), "grad")
        need_x, need_values, need_bias = ctx.needs_input_grad[:3]
        dx = to_tensor(bsr_linear_dx(dy, ctx.matrix)) if need_x else None
        d_values = (
            to_tensor(bsr_linear_dw(dy, to_array(x, "x"), ctx.matrix)) if need_values else None
        )
        d_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias else None
        return dx, d_values, d_bias, None


class BlockSparseLinear(torch.nn.Module):
    """A linear layer whose ``[out_features, in_features]`` weight keeps only some
    ``block x block`` blocks: the forward pass and both gradients touch the kept blocks only
    (moecore's BSR kernels, :mod:`moecore.sparse`).

    Args:
        in_features, out_features: multiples of ``block``.
        block: block edge, one of 8, 16, 32, 64.
        density: fraction of blocks kept, chosen uniformly at random (``seed``).
        bias: learn an ``[out_features]`` bias.
        seed: seeds the pattern and the initial values (fan-in scaled normal).

    Attributes:
        values: ``[nnzb, block, block]`` float32 ``Parameter``: the kept blocks.
        bias: ``[out_features]`` float32 ``Parameter`` or None.
        matrix: the :class:`moecore.sparse.BsrMatrix` whose ``data`` is ``values``' memory.

    Shape:
        ``[..., in_features]`` → ``[..., out_features]``; float32, contiguous, on the CPU.

    Examples::

        >>> layer = BlockSparseLinear(64, 32, block=16, density=0.5, seed=0)
        >>> layer(torch.randn(4, 64)).shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: int,
        density: float,
        bias: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        matrix = BsrMatrix.random((out_features, in_features), block, density, seed)
        self._setup(matrix, torch.zeros(out_features) if bias else None)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, block: int, mask: Any = None, bias: torch.Tensor | None = None
    ) -> BlockSparseLinear:
        """The layer keeping the blocks of ``weight`` (``[out, in]``) that are nonzero, or
        exactly those of the boolean ``mask`` ``[out/B, in/B]``; ``bias`` is copied."""
        matrix = BsrMatrix.from_dense(weight.detach().cpu().numpy(), block, mask)
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer._setup(matrix, None if bias is None else bias.detach().to(torch.float32).clone())
        return layer

    def _setup(self, matrix: BsrMatrix, bias: torch.Tensor | None) -> None:
        self.in_features, self.out_features = matrix.shape[1], matrix.shape[0]
        self.block = matrix.block
        self.values = torch.nn.Parameter(torch.from_numpy(matrix.data))
        self.bias = None if bias is None else torch.nn.Parameter(bias)
        self.matrix = matrix

    def _current_matrix(self) -> BsrMatrix:
        """``matrix``, rebuilt over ``values`` if its memory moved (``.to()``,
        ``param.data = ...``), so the kernels always read the live parameter."""
        check_input(self.values, "values", self.values)
        data = self.matrix.data
        if data.ctypes.data != self.values.data_ptr() or data.dtype != np.float32:
            m = self.matrix
            self.matrix = BsrMatrix(m.shape, m.block, m.indptr, m.indices, self.values.detach())
        return self.matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T + bias`` over the kept blocks."""
        check_input(x, "x", self.values, self.in_features)
        if self.bias is not None:
            check_input(self.bias, "bias", self.values)
        return BsrLinearFunction.apply(x, self.values, self.bias, self._current_matrix())

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (a copy)."""
        return torch.from_numpy(self._current_matrix().to_dense())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block={self.block}, nnzb={self.matrix.nnzb}, bias={self.bias is not None}"
        )
