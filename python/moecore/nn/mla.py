"""Multi-head latent attention (DeepSeek-V2/V3 MLA) and its latent KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moecore import ops
from moecore.autograd.tensor import Tensor
from moecore.nn.gating import attention_gate
from moecore.nn.init import GPT2_STD
from moecore.nn.layers import Dropout, Linear, RMSNorm
from moecore.nn.module import Module
from moecore.ops.attention import rope_tables
from moecore.ops.rotary import rotary


@dataclass
class LatentCache:
    """What MLA keeps per generated token and layer: the normalised KV latent
    ``[B, L, kv_lora_rank]`` and the rotated RoPE key ``[B, L, rope_head_dim]``, shared
    by every head — not the per-head keys and values."""

    latent: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))
    rope_key: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.float32))

    def __len__(self) -> int:
        return int(self.latent.shape[1]) if self.latent.ndim == 3 else 0

    def nbytes(self) -> int:
        """Bytes held (the memory that grows with the context)."""
        return int(self.latent.nbytes + self.rope_key.nbytes)


class MultiHeadLatentAttention(Module):
    """Causal multi-head latent attention (DeepSeek-V2 §2.1, V3 §2.1.1).

    Keys and values come from one low-rank latent ``c = RMSNorm(W_DKV x)`` of width
    ``kv_lora_rank``: per head ``k_nope = W_UK c`` and ``v = W_UV c``. The query comes from a
    latent ``RMSNorm(W_DQ x)`` of width ``q_lora_rank`` (or straight from ``x`` when it is
    0). Position enters through a decoupled RoPE part: each head's query has ``rope_head_dim``
    rotated features, matched by one rotated key ``RoPE(W_KR x)`` shared by every head. The
    attention itself is the fused packed-attention op over heads of width
    ``head_dim + rope_head_dim`` (values zero-padded to that width), so its scale is
    ``1/sqrt(head_dim + rope_head_dim)`` as in MLA.

    In generation (:meth:`decode`) the cache holds only the latent and the RoPE key
    (:class:`LatentCache`), and ``W_UK``/``W_UV`` are absorbed into the query and output
    projections (V2, appendix "absorb").

    Args:
        d_model: model width; ``head_dim = d_model / n_heads`` for the keys and values.
        n_heads: heads.
        kv_lora_rank: width of the joint KV latent (``< d_model``).
        q_lora_rank: width of the query latent; 0 for a full-rank query projection.
        rope_head_dim: rotated features per head (even).
        max_len: longest sequence the rotary tables cover.
        dropout: dropout on the output projection.
        gate: ``"dao"`` for the dynamic attention gate (:func:`attention_gate`), or None.
        init, out_std: as for :class:`moecore.nn.Attention`.

    Shape:
        ``[batch, T, d_model]`` → same.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        kv_lora_rank: int,
        q_lora_rank: int = 0,
        rope_head_dim: int = 16,
        max_len: int = 2048,
        dropout: float = 0.0,
        gate: str | None = None,
        dtype: Any = np.float32,
        init: str = "gpt2",
        out_std: float = GPT2_STD,
    ) -> None:
        super().__init__()
        problems = []
        if n_heads < 1 or d_model % n_heads:
            problems.append(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        if not 1 <= kv_lora_rank < d_model:
            problems.append(f"kv_lora_rank must be in [1, d_model={d_model}), got {kv_lora_rank}")
        if not 0 <= q_lora_rank < d_model:
            problems.append(f"q_lora_rank must be in [0, d_model={d_model}), got {q_lora_rank}")
        if rope_head_dim < 2 or rope_head_dim % 2:
            problems.append(f"rope_head_dim must be even and ≥ 2, got {rope_head_dim}")
        if gate not in (None, "dao"):
            problems.append(f"gate must be None or 'dao', got {gate!r}")
        if problems:
            raise ValueError("MultiHeadLatentAttention: " + "; ".join(problems))
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim, self.rope_dim = d_model // n_heads, rope_head_dim
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        q_width = n_heads * (self.head_dim + rope_head_dim)
        lin: dict[str, Any] = {"bias": False, "dtype": dtype, "init": init}
        if q_lora_rank:
            self.q_down = Linear(d_model, q_lora_rank, **lin)
            self.q_norm = RMSNorm(q_lora_rank, dtype=dtype)
            self.q_up = Linear(q_lora_rank, q_width, **lin)
        else:
            self.q_proj = Linear(d_model, q_width, **lin)
        self.kv_down = Linear(d_model, kv_lora_rank + rope_head_dim, **lin)
        self.kv_norm = RMSNorm(kv_lora_rank, dtype=dtype)
        # rows per head: the head's key (head_dim) then its value (head_dim)
        self.kv_up = Linear(kv_lora_rank, n_heads * 2 * self.head_dim, **lin)
        self.proj = Linear(d_model, d_model, bias=False, dtype=dtype, init=init, std=out_std)
        self.gate = Linear(d_model, 1, bias=True, dtype=dtype, init=init) if gate else None
        self.dropout = Dropout(dropout)
        self.rope = rope_tables(max_len, rope_head_dim)

    def _query(self, x: Tensor) -> Tensor:
        if self.q_lora_rank:
            return self.q_up(self.q_norm(self.q_down(x)))
        return self.q_proj(x)

    def forward(self, x: Tensor) -> Tensor:
        """Attends each position to itself and the positions before it."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MLA expects [batch, T, {self.d_model}], got {x.shape}")
        b, t, _ = x.shape
        if t > self.rope[0].shape[0]:
            raise ValueError(f"sequence of {t} exceeds the rotary tables ({self.rope[0].shape[0]})")
        h, hd, dr, dc = self.n_heads, self.head_dim, self.rope_dim, self.kv_lora_rank
        cos, sin = self.rope[0][:t], self.rope[1][:t]
        q = self._query(x).reshape(b, t, h, hd + dr)
        q_pe = rotary(q[..., hd:], cos[:, None], sin[:, None])
        down = self.kv_down(x)
        latent = self.kv_norm(down[..., :dc])
        k_pe = rotary(down[..., dc:], cos, sin).reshape(b, t, 1, dr)
        kv = self.kv_up(latent).reshape(b, t, h, 2 * hd)
        ones = np.ones((1, 1, h, 1), x.dtype)
        qh = ops.concat([q[..., :hd], q_pe], axis=-1)
        if self.gate is not None:
            qh = qh * attention_gate(self.gate, x).reshape(b, t, 1, 1)
        kh = ops.concat([kv[..., :hd], k_pe * ones], axis=-1)
        # values padded with zeros to the query/key head width, for the one fused op
        vh = ops.concat([kv[..., hd:], Tensor(np.zeros((b, t, h, dr), x.dtype))], axis=-1)
        packed = ops.concat([qh, kh, vh], axis=2).reshape(b, t, 3 * h * (hd + dr))
        out = ops.packed_attention(packed, h, causal=True).reshape(b, t, h, hd + dr)
        return self.dropout(self.proj(out[..., :hd].reshape(b, t, h * hd)))

    def absorbed_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``(w_q_latent [H, dc, q_in], w_out_latent [d, H, dc])``: ``W_UKᵀ`` folded into the
        no-position part of the query projection, ``W_UV`` into the output projection."""
        h, hd, dr, dc = self.n_heads, self.head_dim, self.rope_dim, self.kv_lora_rank
        up = self.kv_up.weight.data.astype(np.float64).reshape(h, 2 * hd, dc)
        q_w = (self.q_up if self.q_lora_rank else self.q_proj).weight.data.astype(np.float64)
        q_nope = q_w.reshape(h, hd + dr, -1)[:, :hd]  # [H, hd, q_in]
        w_q_latent = np.einsum("hkc,hki->hci", up[:, :hd], q_nope)
        w_o = self.proj.weight.data.astype(np.float64).reshape(self.d_model, h, hd)
        w_out_latent = np.einsum("dhk,hkc->dhc", w_o, up[:, hd:])
        return w_q_latent, w_out_latent

    def decode(self, x: np.ndarray, cache: LatentCache) -> np.ndarray:
        """Attention output for the new positions ``x [B, n, d_model]`` following the
        ``len(cache)`` cached ones, computed on the latent cache with the absorbed
        projections; appends the new latents and RoPE keys to ``cache``. Inference only."""
        _b, n, _ = x.shape
        start = len(cache)
        if start + n > self.rope[0].shape[0]:
            raise ValueError(
                f"positions up to {start + n} exceed the rotary tables ({self.rope[0].shape[0]})"
            )
        h, hd, dr, dc = self.n_heads, self.head_dim, self.rope_dim, self.kv_lora_rank
        xt = Tensor(x)
        cos, sin = self.rope[0][start : start + n], self.rope[1][start : start + n]
        down = self.kv_down(xt)
        latent = self.kv_norm(down[..., :dc]).data
        k_pe = rotary(down[..., dc:], cos, sin).data
        if start == 0:
            cache.latent, cache.rope_key = latent, k_pe
        else:
            cache.latent = np.concatenate([cache.latent, latent], axis=1)
            cache.rope_key = np.concatenate([cache.rope_key, k_pe], axis=1)
        q_in = self.q_norm(self.q_down(xt)).data if self.q_lora_rank else x
        q_pe_w = (self.q_up if self.q_lora_rank else self.q_proj).weight.data
        q_pe_w = q_pe_w.reshape(h, hd + dr, -1)[:, hd:]  # [H, dr, q_in]
        q_pe = rotary(Tensor(np.einsum("bni,hri->bnhr", q_in, q_pe_w)), cos[:, None], sin[:, None])
        w_q_latent, w_out_latent = self.absorbed_weights()
        q_lat = np.einsum("bni,hci->bnhc", q_in.astype(np.float64), w_q_latent)
        scores = np.einsum("bnhc,blc->bhnl", q_lat, cache.latent.astype(np.float64))
        scores += np.einsum("bnhr,blr->bhnl", q_pe.data, cache.rope_key.astype(np.float64))
        scores /= np.sqrt(hd + dr)
        if self.gate is not None:
            g = attention_gate(self.gate, xt).data.astype(np.float64)  # [B, n, 1]
            scores *= g.transpose(0, 2, 1)[:, :, :, None]
        total = start + n
        future = np.arange(total)[None, :] > (start + np.arange(n))[:, None]
        scores[:, :, future] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        mixed = np.einsum("bhnl,blc->bnhc", p, cache.latent.astype(np.float64))
        out = np.einsum("bnhc,dhc->bnd", mixed, w_out_latent)
        return out.astype(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, kv_lora_rank={self.kv_lora_rank}, "
            f"q_lora_rank={self.q_lora_rank}, rope_head_dim={self.rope_dim}, "
            f"gate={'dao' if self.gate is not None else None}"
        )
