"""Fused cross-entropy: log-softmax and negative log-likelihood in one op."""

from __future__ import annotations

from typing import Any

from moecore.autograd.function import Context, Function
from moecore.autograd.tensor import Tensor
from moecore.backend import xp_of


class CrossEntropy(Function):
    """Mean over non-ignored targets of ``-log softmax(logits)[target]``."""

    @staticmethod
    def forward(ctx: Context, logits: Any, targets: Any, ignore_index: int = -100) -> Any:
        xp = xp_of(logits)
        vocab = logits.shape[-1]
        z = logits.reshape(-1, vocab)
        t = targets.reshape(-1)
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"cross_entropy: {z.shape[0]} rows of logits but {t.shape[0]} targets")
        if t.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: targets must be integers, got {t.dtype}")
        keep = t != ignore_index
        if t.size and (bool((t[keep] < 0).any()) or bool((t[keep] >= vocab).any())):
            raise ValueError(
                f"cross_entropy: targets must lie in [0, {vocab}) or be {ignore_index}"
            )
        safe = xp.where(keep, t, 0)
        m = z.max(axis=1, keepdims=True)
        e = xp.exp(z - m)
        s = e.sum(axis=1, keepdims=True)
        rows = xp.arange(z.shape[0])
        logp_t = z[rows, safe] - m[:, 0] - xp.log(s[:, 0])
        count = int(keep.sum())
        ctx.count = count
        ctx.shape = logits.shape
        # Softmax probabilities are what backward needs; keep them instead of the logits.
        e /= s
        ctx.save_for_backward(e, safe, keep)
        loss = -(logp_t * keep).sum() / max(count, 1)
        return xp.asarray(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        p, safe, keep = ctx.saved_tensors
        xp = xp_of(p)
        grad = p  # reuse the saved buffer: it is freed after this call anyway
        grad[xp.arange(grad.shape[0]), safe] -= 1
        grad *= (keep * (g / max(ctx.count, 1)))[:, None].astype(grad.dtype, copy=False)
        return grad.reshape(ctx.shape), None


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -100) -> Tensor:
    """Cross-entropy between ``logits [..., V]`` and integer ``targets [...]``, averaged over
    the targets that are not ``ignore_index`` (0 when all are ignored)."""
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index)
