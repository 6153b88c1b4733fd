"""``MoE``: a routed Mixture-of-Experts feed-forward layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore import ops
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of
from moecore.nn import init as initializers
from moecore.nn.layers import Linear
from moecore.nn.module import Module
from moecore.nn.parameter import Parameter
from moecore.ops.moe import ACTIVATIONS, ExpertExchange, StatsGroup, moe


def routing_summary(tokens_per_expert: Any) -> dict[str, Any]:
    """min / max / coefficient of variation / dead experts of a per-expert token count."""
    counts = np.asarray(tokens_per_expert, dtype=np.float64)
    mean = counts.mean() if counts.size else 0.0
    return {
        "min": int(counts.min()) if counts.size else 0,
        "max": int(counts.max()) if counts.size else 0,
        "cv": float(counts.std() / mean) if mean > 0 else 0.0,
        "dead": int((counts == 0).sum()),
    }


class MoE(Module):
    """Mixture-of-Experts feed-forward layer: a router sends each token to ``top_k`` of
    ``n_experts`` expert FFNs and sums their outputs weighted by the routing scores.

    Args:
        d_model: input and output width.
        d_ff: hidden width of each expert.
        n_experts: number of routed experts.
        top_k: experts per token.
        score: ``"softmax"`` or ``"sigmoid"`` router scores (router math in float32).
        capacity_factor: None for dropless; else each expert takes at most
            ``ceil(capacity_factor · tokens · top_k / n_experts)`` tokens, dropping the
            lowest-weighted assignments.
        aux_loss: coefficient α of the Switch load-balancing loss α·E·Σ fᵢ·Pᵢ.
        z_loss: coefficient of the router z-loss (mean squared log-sum-exp of the logits).
        bias_update_rate: γ of DeepSeek-V3 aux-loss-free balancing; after each optimizer
            step, :meth:`update_bias` moves bᵢ by γ·sign(mean(c) − cᵢ); the bias changes
            which experts are chosen, never the weights.
        n_shared_experts: experts every token always goes through (DeepSeek-MoE).
        n_groups, topk_groups: group-limited routing (DeepSeek-V3): the experts form
            ``n_groups`` contiguous groups, a group scores the sum of its two best (biased)
            scores and each token picks its experts among its ``topk_groups`` best groups.
        seq_aux_loss: α of DeepSeek-V3's complementary sequence-wise balance loss
            (:func:`moecore.ops.moe.add_sequence_balance_loss`; ``x [batch, T, d]`` is
            ``batch`` sequences), injected in backward like ``aux_loss``.
        routed_scale: factor on the routed experts' weighted sum (DeepSeek-V3's
            ``routed_scaling_factor``), before the shared experts are added.
        activation: ``"gelu"`` (tanh approximation), ``"swiglu"`` or ``"relu"``.
        init: ``"gpt2"`` (router and ``w1`` N(0, 0.02²), ``w2`` N(0, out_std²)) or
            ``"torch"`` (PyTorch's fan-in uniform, as if each were a Linear).
        out_std: std of ``w2`` (and the shared experts' output) under ``"gpt2"``: it writes
            into the residual stream (a model passes ``nn.init.residual_std(n_layers)``).
        bias: learn a bias on each expert's two matrices (``b1``, ``b2``; see docs/recipe.md).

    Both auxiliary losses reach the router through the op's backward: nothing has to be
    added to the caller's loss. Each forward in training records ``last_stats``.

    Attributes:
        aux_loss_scale: factor on those injected gradients, to match how the caller scales
            its loss before backward (a trainer dividing ``n`` accumulated micro-batch
            losses by ``n`` sets ``1/n``); 1 by default. Read at each forward.
        exchange, stats_group: None here; :class:`moecore.distributed.ExpertParallelMoE`
            (this layer with its experts spread over processes) sets them, see
            :func:`moecore.ops.moe`.

    Shape:
        ``[..., d_model]`` → ``[..., d_model]``.

    Examples:
        >>> layer = MoE(16, 32, n_experts=4, top_k=2)
        >>> layer(moecore.randn(2, 5, 16)).shape
        (2, 5, 16)
    """

    #: Expert parallelism's hooks (see Attributes); None: every expert is here.
    exchange: ExpertExchange | None = None
    stats_group: StatsGroup | None = None
    #: The shared experts' two layers (only when ``n_shared_experts``).
    shared_in: Module
    shared_out: Module

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int = 2,
        score: str = "softmax",
        capacity_factor: float | None = None,
        aux_loss: float = 0.01,
        z_loss: float = 0.0,
        bias_update_rate: float = 0.0,
        n_shared_experts: int = 0,
        n_groups: int | None = None,
        topk_groups: int | None = None,
        activation: str = "gelu",
        dtype: Any = np.float32,
        init: str = "gpt2",
        out_std: float = initializers.GPT2_STD,
        bias: bool = False,
        seq_aux_loss: float = 0.0,
        routed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        problems = []
        if init not in initializers.INITS:
            problems.append(f"init must be one of {initializers.INITS}, got {init!r}")
        self._configure(
            problems,
            d_model,
            d_ff,
            n_experts,
            top_k=top_k,
            score=score,
            capacity_factor=capacity_factor,
            aux_loss=aux_loss,
            z_loss=z_loss,
            bias_update_rate=bias_update_rate,
            n_shared_experts=n_shared_experts,
            n_groups=n_groups,
            topk_groups=topk_groups,
            activation=activation,
            seq_aux_loss=seq_aux_loss,
            routed_scale=routed_scale,
        )
        gate = 2 if activation == "swiglu" else 1
        std = initializers.GPT2_STD
        w = initializers.weight
        self.router = Parameter(w((n_experts, d_model), d_model, init, std, dtype))
        self.w1 = Parameter(w((n_experts, d_model, gate * d_ff), d_model, init, std, dtype))
        self.w2 = Parameter(w((n_experts, d_ff, d_model), d_ff, init, out_std, dtype))
        b = initializers.bias
        b1 = Parameter(b((n_experts, gate * d_ff), d_model, init, dtype)) if bias else None
        b2 = Parameter(b((n_experts, d_model), d_ff, init, dtype)) if bias else None
        self.register_parameter("b1", b1)
        self.register_parameter("b2", b2)
        if n_shared_experts:
            hidden = n_shared_experts * d_ff
            # n shared experts summed equal one FFN with their hidden units side by side.
            self.shared_in = Linear(d_model, gate * hidden, bias=False, dtype=dtype, init=init)
            self.shared_out = Linear(
                hidden, d_model, bias=False, dtype=dtype, init=init, std=out_std
            )

    def _configure(
        self,
        problems: list[str],
        d_model: int,
        d_ff: int,
        n_experts: int,
        *,
        top_k: int,
        score: str,
        capacity_factor: float | None,
        aux_loss: float,
        z_loss: float,
        bias_update_rate: float,
        n_shared_experts: int,
        n_groups: int | None,
        topk_groups: int | None,
        activation: str,
        expert_bias: Any = None,
        seq_aux_loss: float = 0.0,
        routed_scale: float = 1.0,
    ) -> None:
        """Checks (raising every problem at once, with ``problems`` found by the caller)
        and sets the routing configuration and state; the caller brings the weights."""
        if n_experts < 1:
            problems.append(f"n_experts must be ≥ 1, got {n_experts}")
        if not 1 <= top_k <= max(n_experts, 1):
            problems.append(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if score not in ("softmax", "sigmoid"):
            problems.append(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            problems.append(f"capacity_factor must be positive or None, got {capacity_factor}")
        if (n_groups is None) != (topk_groups is None):
            problems.append("n_groups and topk_groups go together")
        elif (
            n_groups is not None
            and topk_groups is not None
            and (n_experts % n_groups or not 1 <= topk_groups <= n_groups)
        ):
            problems.append(f"n_groups={n_groups} must divide n_experts and topk_groups ≤ n_groups")
        elif (
            n_groups is not None
            and topk_groups is not None
            and topk_groups * (n_experts // n_groups) < min(top_k, n_experts)
        ):
            problems.append(
                f"topk_groups={topk_groups} groups of {n_experts // n_groups} experts cannot "
                f"hold top_k={top_k} experts"
            )
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        self.d_model, self.d_ff, self.n_experts, self.top_k = d_model, d_ff, n_experts, top_k
        self.score, self.capacity_factor, self.activation = score, capacity_factor, activation
        self.aux_loss, self.z_loss, self.bias_update_rate = aux_loss, z_loss, bias_update_rate
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.seq_aux_loss, self.routed_scale = seq_aux_loss, routed_scale
        self.n_shared_experts = n_shared_experts
        self.aux_loss_scale = 1.0
        bias = np.zeros(n_experts, np.float32) if expert_bias is None else expert_bias
        self.register_buffer("expert_bias", np.array(bias, dtype=np.float32))
        self.last_stats: dict[str, Any] = {}
        self._load_since_update = np.zeros(n_experts, np.int64)

    def forward(self, x: Tensor) -> Tensor:
        """Routes the tokens of ``x`` to their experts and combines the outputs."""
        if x.shape[-1] != self.d_model:
            name = type(self).__name__
            raise ValueError(f"{name} expects [..., {self.d_model}], got {x.shape}")
        stats: dict[str, Any] = {}
        bias = self.expert_bias if self.bias_update_rate else None
        y = moe(
            x,
            self.router,
            self.w1,
            self.w2,
            k=self.top_k,
            score=self.score,
            bias=bias,
            n_groups=self.n_groups,
            topk_groups=self.topk_groups,
            capacity_factor=self.capacity_factor,
            activation=self.activation,
            aux_loss=self.aux_loss if self.training else 0.0,
            z_loss=self.z_loss if self.training else 0.0,
            stats=stats,
            b1=self.b1,
            b2=self.b2,
            aux_loss_scale=self.aux_loss_scale,
            exchange=self.exchange,
            stats_group=self.stats_group,
            seq_aux_loss=self.seq_aux_loss if self.training else 0.0,
        )
        if self.routed_scale != 1.0:
            y = y * self.routed_scale
        if self.n_shared_experts:
            y = y + shared_experts(self, x)
        load = np.asarray(
            stats["tokens_per_expert"] if xp_of(x.data) is np else stats["tokens_per_expert"].get()
        )
        stats.update(routing_summary(load))
        self.last_stats = stats
        if self.training:
            self._load_since_update += load
        return y

    def update_bias(self, load: Any = None) -> None:
        """DeepSeek-V3 aux-loss-free balancing: bᵢ += γ·sign(mean(c) − cᵢ) with ``c`` the
        tokens per expert since the last update (or ``load``, e.g. summed over ranks)."""
        if not self.bias_update_rate:
            return
        c = np.asarray(self._load_since_update if load is None else load, dtype=np.float64)
        step = self.bias_update_rate * np.sign(c.mean() - c)
        self.expert_bias += step.astype(self.expert_bias.dtype)
        self._load_since_update[...] = 0

    def extra_repr(self) -> str:
        cap = (
            "dropless"
            if self.capacity_factor is None
            else f"capacity_factor={self.capacity_factor}"
        )
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, "
            f"top_k={self.top_k}, score={self.score}, {cap}, activation={self.activation}, "
            f"shared={self.n_shared_experts}"
            + (f", groups={self.topk_groups}/{self.n_groups}" if self.n_groups else "")
            + (f", routed_scale={self.routed_scale}" if self.routed_scale != 1.0 else "")
        )


def update_router_biases(model: Module) -> None:
    """Calls :meth:`MoE.update_bias` on every MoE layer of ``model`` (after optimizer steps)."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.update_bias()


def shared_experts(layer: Any, x: Tensor) -> Tensor:
    """The always-on shared experts of ``layer`` (an ``nn.MoE`` or its expert-parallel
    form): ``shared_out(act(shared_in(x)))`` with the layer's activation."""
    h = layer.shared_in(x)
    if layer.activation == "swiglu":
        h = ops.swiglu(h)
    else:
        h = ops.gelu(h) if layer.activation == "gelu" else h.relu()
    return layer.shared_out(h)
