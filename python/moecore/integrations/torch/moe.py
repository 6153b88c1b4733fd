"""The MoE layer as a ``torch.nn.Module``: moecore's routing, permutation, fused GELU expert
FFN and unpermute, forward and backward, on torch tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from moecore.autograd.function import Context
from moecore.integrations.torch._tensors import (
    check_float_dtype,
    check_input,
    to_array,
    to_tensor,
)
from moecore.ops.moe import ACTIVATIONS
from moecore.ops.moe import MoEFunction as OpMoEFunction

__all__ = ["MoE", "MoEFunction"]


class MoEFunction(torch.autograd.Function):
    """The MoE op of :func:`moecore.ops.moe` as a ``torch.autograd.Function``: moecore's op
    runs on views of the tensors (no copy) and its backward, with the load-balancing and
    z-loss gradients injected, gives the tensors' gradients.

    ``apply(x, router_w, w1, w2, options)``: ``x`` ``[..., d]``, ``router_w`` ``[E, d]``,
    ``w1`` ``[E, d, h]``, ``w2`` ``[E, h, d_out]``; ``options`` are the keyword arguments of
    :func:`moecore.ops.moe` (``k``, ``score``, ``aux_loss``, ``stats``, ...). Every tensor is
    contiguous, on one device, float32 (moecore's kernels) or float64 (its array-module
    kernels, for gradient checks); :class:`MoE` checks that.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        router_w: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        options: dict[str, Any],
    ) -> torch.Tensor:
        state = Context(OpMoEFunction, ())
        y = OpMoEFunction.forward(
            state,
            to_array(x, "x"),
            to_array(router_w, "router_w"),
            to_array(w1, "w1"),
            to_array(w2, "w2"),
            None,
            None,
            **_op_options(options),
        )
        ctx.moe_state = state
        return to_tensor(y)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # What forward saved lives on ctx, freed with the graph (not here: a retained graph,
        # as gradcheck's, runs backward again).
        d_x, d_router, d_w1, d_w2, _, _ = OpMoEFunction.backward(
            ctx.moe_state, to_array(grad.contiguous(), "grad")
        )
        return to_tensor(d_x), to_tensor(d_router), to_tensor(d_w1), to_tensor(d_w2), None


def _op_options(options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :meth:`moecore.ops.moe.MoEFunction.forward`, defaulted."""
    full: dict[str, Any] = {
        "k": 2,
        "score": "softmax",
        "bias": None,
        "n_groups": None,
        "topk_groups": None,
        "capacity_factor": None,
        "activation": "gelu",
        "aux_loss": 0.0,
        "z_loss": 0.0,
        "stats": None,
    }
    full.update(options)
    return full


class MoE(torch.nn.Module):
    r"""A routed-experts layer running moecore's kernels on torch tensors.

    Each token goes to its ``top_k`` experts (softmax or sigmoid router scores); each expert
    is ``gelu_tanh(x @ w1[e]) @ w2[e]`` (``"relu"`` and ``"swiglu"`` too, unfused); the outputs
    are summed with the routing weights (renormalised over the chosen experts when
    ``top_k > 1``). As in moecore's own :class:`moecore.nn.MoE` (Megatron-Core's way), the
    Switch load-balancing loss and the router z-loss reach the router through backward:
    nothing has to be added to the loss. Their values are in ``last_stats`` after each forward.

    Args:
        d_model: token features.
        d_ff: hidden features of each expert.
        n_experts: E.
        top_k: experts per token.
        score: ``"softmax"`` or ``"sigmoid"``.
        capacity_factor: None for dropless; else each expert takes at most
            ``ceil(capacity_factor · tokens · top_k / n_experts)`` assignments.
        aux_loss: coefficient α of the Switch loss α·E·Σ fᵢ·Pᵢ (training only).
        z_loss: coefficient of the router z-loss (training only).
        activation: ``"gelu"`` (one fused kernel), ``"relu"`` or ``"swiglu"``.
        device: where the parameters live (CPU; CUDA needs CuPy and is not tested here).
        dtype: ``torch.float32`` (moecore's kernels) or ``torch.float64`` (its array-module
            kernels, for gradient checks).

    Attributes:
        router: ``[E, d_model]``; w1: ``[E, d_model, d_ff]`` (``2·d_ff`` for SwiGLU);
            w2: ``[E, d_ff, d_model]``: ``torch.nn.Parameter`` s, N(0, 0.02²).
        aux_loss_scale: factor on the injected auxiliary gradients, matching how the caller
            scales its loss before backward (``1/n`` for ``n`` accumulated micro-batches).
        last_stats: routing counts, ``aux_loss``, ``z_loss``, ``dropped`` of the last forward.

    Shape:
        ``[..., d_model]`` → ``[..., d_model]``; the input must be contiguous, on the
        parameters' device and of their dtype (else an error naming ``x``).

    Examples::

        >>> layer = MoE(16, 32, n_experts=4, top_k=2)
        >>> layer(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    aux_loss_scale: float = 1.0

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int = 2,
        *,
        score: str = "softmax",
        capacity_factor: float | None = None,
        aux_loss: float = 0.01,
        z_loss: float = 0.0,
        activation: str = "gelu",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k: expected an integer in [1, {n_experts}], got {top_k}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f'score: expected "softmax" or "sigmoid", got {score!r}')
        factory = {"device": device, "dtype": check_float_dtype(dtype)}
        gate = 2 if activation == "swiglu" else 1
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.score, self.capacity_factor, self.activation = score, capacity_factor, activation
        self.aux_loss, self.z_loss = float(aux_loss), float(z_loss)
        self.router = torch.nn.Parameter(torch.empty(n_experts, d_model, **factory))
        self.w1 = torch.nn.Parameter(torch.empty(n_experts, d_model, gate * d_ff, **factory))
        self.w2 = torch.nn.Parameter(torch.empty(n_experts, d_ff, d_model, **factory))
        self.last_stats: dict[str, Any] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router and experts N(0, 0.02²), GPT-2's initialisation (as moecore's ``"gpt2"``)."""
        for p in (self.router, self.w1, self.w2):
            torch.nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routes the tokens of ``x`` to their experts and combines the outputs."""
        check_input(x, "x", self.router, self.d_model)
        for name in ("router", "w1", "w2"):
            check_input(getattr(self, name), name, self.router)
        stats: dict[str, Any] = {}
        options = {
            "k": self.top_k,
            "score": self.score,
            "capacity_factor": self.capacity_factor,
            "activation": self.activation,
            "aux_loss": self.aux_loss if self.training else 0.0,
            "z_loss": self.z_loss if self.training else 0.0,
            "stats": stats,
            "aux_loss_scale": self.aux_loss_scale,
        }
        y = MoEFunction.apply(x, self.router, self.w1, self.w2, options)
        self.last_stats = stats
        return y

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, "
            f"top_k={self.top_k}, score={self.score!r}, activation={self.activation!r}"
            + ("" if self.capacity_factor is None else f", capacity_factor={self.capacity_factor}")
            + (f", aux_loss={self.aux_loss}" if self.aux_loss else "")
            + (f", z_loss={self.z_loss}" if self.z_loss else "")
        )
