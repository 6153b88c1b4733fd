"""The moe-small model written in PyTorch eager, the way a PyTorch user would write it, with
the same semantics as ``moecore.models.MoETransformer`` (pre-norm, learned positions, packed
q/k/v, causal SDPA, top-k softmax router renormalised over the chosen experts, GELU (tanh)
experts, Switch aux loss, tied output layer) and loadable from a moecore ``state_dict``, so
both start from the very same weights. For benchmarks only (torch is never a dependency)."""

from __future__ import annotations

from typing import Any

import numpy as np


def build(torch: Any, cfg: Any, state: dict[str, np.ndarray]) -> Any:
    """A torch ``nn.Module`` for ``cfg`` (a moecore ModelConfig/RunConfig) holding ``state``."""
    nn, f = torch.nn, torch.nn.functional

    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            e, d, h = cfg.n_experts, cfg.d_model, cfg.d_ff
            self.router = nn.Parameter(torch.empty(e, d))
            self.w1 = nn.Parameter(torch.empty(e, d, h))
            self.w2 = nn.Parameter(torch.empty(e, h, d))
            self.register_buffer("expert_bias", torch.zeros(e))
            self.aux = torch.zeros(())

        def forward(self, x: Any) -> Any:
            lead = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
            t, e, k = x.shape[0], cfg.n_experts, cfg.top_k
            probs = torch.softmax(x @ self.router.T, dim=-1)
            w, idx = torch.topk(probs, k, dim=-1)
            if k > 1:
                w = w / w.sum(-1, keepdim=True)
            flat = idx.flatten()
            if self.training and cfg.aux_loss:
                frac = torch.bincount(flat, minlength=e).to(x.dtype) / (t * k)
                self.aux = cfg.aux_loss * e * (frac * probs.mean(0)).sum()
            # sort-gather-scatter: tokens in expert order, one matmul pair per expert
            order = torch.argsort(flat, stable=True)
            tok = order // k
            xs = x.index_select(0, tok)
            counts = torch.bincount(flat, minlength=e).tolist()
            outs = [
                f.gelu(chunk @ self.w1[i], approximate="tanh") @ self.w2[i]
                for i, chunk in enumerate(xs.split(counts))
            ]
            ys = torch.cat(outs) * w.flatten()[order].unsqueeze(1)
            y = torch.zeros_like(x).index_add(0, tok, ys)
            return y.reshape(*lead, -1)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
            self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

        def forward(self, x: Any) -> Any:
            b, t, d = x.shape
            heads = cfg.n_heads
            q, k, v = self.qkv(x).split(d, dim=-1)
            q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
            y = f.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, t, d))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
            self.attn = Attention()
            self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
            self.ffn = MoE()

        def forward(self, x: Any) -> Any:
            x = x + self.attn(self.norm1(x))
            return x + self.ffn(self.norm2(x))

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Parameter(torch.empty(cfg.seq_len, cfg.d_model))
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layers))
            self.norm = nn.LayerNorm(cfg.d_model, eps=1e-5)

        def forward(self, ids: Any, targets: Any) -> tuple[Any, Any]:
            x = self.tok_emb(ids) + self.pos_emb[: ids.shape[1]]
            for block in self.blocks:
                x = block(x)
            logits = self.norm(x) @ self.tok_emb.weight.T
            ce = f.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            aux = sum(b.ffn.aux for b in self.blocks) if self.training else 0.0
            return ce, aux

    unsupported = {
        "norm": (cfg.norm, "layernorm"),
        "position": (cfg.position, "learned"),
        "activation": (cfg.activation, "gelu"),
        "score": (cfg.score, "softmax"),
        "moe_every": (cfg.moe_every, 1),
        "first_dense_layers": (cfg.first_dense_layers, 0),
        "n_shared_experts": (cfg.n_shared_experts, 0),
        "dropout": (cfg.dropout, 0.0),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"the torch twin supports {key}={want!r} only, got {got!r}")
    model = Transformer()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model
