"""CPU kernels of a Mixture-of-Experts layer, on plain numpy arrays.

The pieces of an MoE layer's forward and backward pass, in the order they run::

    expert_idx, weights, probs = route(logits, k)            # [T, E] -> [T, k], [T, k], [T, E]
    x_sorted, order, counts = permute(x, expert_idx, E)      # tokens in expert-contiguous order
    h = grouped_matmul(x_sorted, counts, w1)                 # each expert's rows times w1[e]
    ...                                                      # activation, second matmul
    y = unpermute(y_sorted, order, weights)                  # weighted sum back to [T, d]

and the backward of each (``route_backward``, ``permute_backward``, ``unpermute_backward``,
``grouped_matmul_dx``, ``grouped_matmul_dw``). They follow Megatron-Core / MegaBlocks
semantics (DeepSeek-V3 for the biased and group-limited routing).

Conventions, for every function here:

- Floating arrays are ``float32`` and index arrays ``int32``, C-contiguous, of the stated number
  of dimensions: numpy arrays or any CPU DLPack exporter (a PyTorch or JAX CPU tensor), viewed
  in place (:func:`moecore.backend.as_array`). Nothing is converted or copied on the way in (wrong dtype, layout or shape is a
  ``ValueError`` naming the argument, the expected and the actual value) and results are fresh
  numpy arrays that own memory allocated by the kernel (no copy on the way out either).
- ``T`` tokens, ``E`` experts, ``k`` experts per token, ``R`` sorted rows. The *flat assignment
  index* of token ``t``'s ``j``-th choice is ``t * k + j``.
- Inconsistent indices (``expert_idx`` outside ``[0, E)``, ``order`` outside ``[-1, T*k)`` or
  naming an assignment twice, ``counts`` negative or not summing to ``R``) raise ``ValueError``
  before any work; nothing reads or writes out of bounds.
- The work runs in Rust with the GIL released, on all of rayon's threads.
"""

from __future__ import annotations

import operator
from typing import Literal

import numpy as np

from moecore import _core
from moecore.backend import as_array

__all__ = [
    "gelu_ffn",
    "gelu_ffn_backward",
    "grouped_matmul",
    "grouped_matmul_dw",
    "grouped_matmul_dx",
    "permute",
    "permute_backward",
    "route",
    "route_backward",
    "router_backward",
    "router_logits",
    "unpermute",
    "unpermute_backward",
]

Score = Literal["softmax", "sigmoid"]


def _int(name: str, value: object) -> int:
    """``value`` as a Python int, or a ValueError naming ``name`` (bools are refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def _opt_int(name: str, value: object) -> int | None:
    return None if value is None else _int(name, value)


def _score(score: object) -> str:
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f'score: expected "softmax" or "sigmoid", got {score!r}')
    return str(score)


def route(
    logits: np.ndarray,
    k: int,
    score: Score = "softmax",
    bias: np.ndarray | None = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Routes each token to ``k`` experts.

    Args:
        logits: ``[T, E]`` float32 router logits (finite).
        k: experts per token, ``1 <= k <= E``.
        score: ``"softmax"`` over each token's experts, or an independent ``"sigmoid"`` per
            expert; computed in float32, numerically stable.
        bias: optional ``[E]`` float32 added to the scores *for the choice only*
            (DeepSeek-V3 auxiliary-loss-free load balancing); the weights ignore it.
        n_groups, topk_groups: group-limited routing (DeepSeek-V3): the experts form
            ``n_groups`` contiguous groups of ``E / n_groups``; a group's score is the sum of
            its two best choice scores (its best one if groups have one expert); only the
            experts of the best ``topk_groups`` groups compete. Both or neither.
        normalize: divide the chosen probabilities by their sum (so a token's weights sum to
            1; 0 if that sum underflows to 0); ``False`` keeps the raw probabilities (Switch
            with ``k = 1`` needs that so the router gets a gradient).

    Returns:
        ``(expert_idx, weights, probs)``: ``expert_idx`` ``[T, k]`` int32, the top-k of
        ``probs + bias`` by descending score, ties broken by the lower expert index;
        ``weights`` ``[T, k]`` float32, the unbiased probabilities of the chosen experts
        (renormalised if asked); ``probs`` ``[T, E]`` float32, the softmax or sigmoid.
    """
    return _core.moe_route(
        as_array(logits, "logits"),
        _int("k", k),
        _score(score),
        as_array(bias, "bias"),
        _opt_int("n_groups", n_groups),
        _opt_int("topk_groups", topk_groups),
        bool(normalize),
    )


def route_backward(
    d_weights: np.ndarray,
    expert_idx: np.ndarray,
    probs: np.ndarray,
    score: Score = "softmax",
    normalize: bool = True,
) -> np.ndarray:
    """Gradient of :func:`route`'s ``weights`` with respect to ``logits``.

    Args:
        d_weights: ``[T, k]`` float32, the gradient of the loss with respect to ``weights``.
        expert_idx: ``[T, k]`` int32, the choice :func:`route` made (held fixed: the choice
            itself has no gradient).
        probs: ``[T, E]`` float32, the ``probs`` :func:`route` returned.
        score, normalize: as given to :func:`route`.

    Returns:
        ``d_logits`` ``[T, E]`` float32: through the renormalisation (if ``normalize``) and
        the softmax or sigmoid. Experts a token did not choose still get gradient through the
        softmax's denominator; under ``"sigmoid"`` they get 0.
    """
    return _core.moe_route_backward(
        as_array(d_weights, "d_weights"),
        as_array(expert_idx, "expert_idx"),
        as_array(probs, "probs"),
        _score(score),
        bool(normalize),
    )


def permute(
    x: np.ndarray,
    expert_idx: np.ndarray,
    n_experts: int,
    capacity: int | None = None,
    weights: np.ndarray | None = None,
    pad_to: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gathers the token rows into expert-contiguous order.

    Args:
        x: ``[T, d]`` float32 token activations.
        expert_idx: ``[T, k]`` int32 experts of each token (from :func:`route`), in
            ``[0, n_experts)``, ``1 <= k <= n_experts``.
        n_experts: E.
        capacity: at most this many rows per expert (before padding). An expert chosen by
            more assignments drops the ones with the lowest weight first (equal weights: the
            later assignment first). Dropped assignments appear nowhere in the output; find
            them as the flat indices missing from ``order``. Needs ``weights``.
        weights: ``[T, k]`` float32 routing weights; only used to decide what to drop.
        pad_to: each expert's rows are followed by zero rows up to a multiple of ``pad_to``
            (for block kernels).

    Returns:
        ``(x_sorted, order, counts)``: ``x_sorted`` ``[R, d]`` float32, expert 0's rows first,
        each expert's rows in increasing flat assignment index (stable); ``order`` ``[R]``
        int32, the flat assignment index ``t * k + j`` each row came from, ``-1`` for a
        padding row; ``counts`` ``[E]`` int32, each expert's rows *including* padding, so
        ``counts.sum() == R`` and ``np.split(x_sorted, np.cumsum(counts)[:-1])`` gives the
        experts' blocks.
    """
    return _core.moe_permute(
        as_array(x, "x"),
        as_array(expert_idx, "expert_idx"),
        _int("n_experts", n_experts),
        _opt_int("capacity", capacity),
        as_array(weights, "weights"),
        _int("pad_to", pad_to),
    )


def _tokens_and_k(
    weights: np.ndarray | None, n_tokens: int | None, k: int | None
) -> tuple[int, int]:
    """``(T, k)`` from the explicit arguments, else from ``weights``' shape."""
    if weights is None:
        if n_tokens is None or k is None:
            raise ValueError(
                "n_tokens, k: expected both integers when weights is None, "
                f"got n_tokens={n_tokens!r}, k={k!r}"
            )
        return _int("n_tokens", n_tokens), _int("k", k)
    shape = getattr(weights, "shape", None)
    if not isinstance(weights, np.ndarray) or shape is None or len(shape) != 2:
        raise ValueError(
            f"weights: expected a 2-D numpy array of float32 [T, k], got {type(weights).__name__}"
            + (f" of shape {shape}" if shape is not None else "")
        )
    t = shape[0] if n_tokens is None else _int("n_tokens", n_tokens)
    kk = shape[1] if k is None else _int("k", k)
    return t, kk


def unpermute(
    y_sorted: np.ndarray,
    order: np.ndarray,
    weights: np.ndarray | None = None,
    n_tokens: int | None = None,
    k: int | None = None,
) -> np.ndarray:
    """Sums each token's rows back into token order, weighted.

    ``y[t] = sum_j weights[t, j] * y_sorted[r]`` over the rows ``r`` with
    ``order[r] == t * k + j`` (weight 1 when ``weights`` is None). Padding rows (``-1``) and
    dropped assignments contribute nothing.

    Args:
        y_sorted: ``[R, d]`` float32 rows in the order :func:`permute` made.
        order: ``[R]`` int32 from :func:`permute`: values in ``[-1, T*k)``, no assignment
            twice.
        weights: ``[T, k]`` float32 routing weights, or None for weight 1.
        n_tokens, k: T and k; default to ``weights.shape``, required when ``weights`` is None.

    Returns:
        ``y`` ``[T, d]`` float32.
    """
    weights = as_array(weights, "weights")
    t, kk = _tokens_and_k(weights, n_tokens, k)
    return _core.moe_unpermute(
        as_array(y_sorted, "y_sorted"), as_array(order, "order"), weights, t, kk
    )


def permute_backward(dx_sorted: np.ndarray, order: np.ndarray, n_tokens: int, k: int) -> np.ndarray:
    """Gradient of :func:`permute` with respect to ``x``.

    ``dx[t] = sum_j dx_sorted[r]`` over the rows ``r`` with ``order[r] == t * k + j``; padding
    rows and dropped assignments contribute nothing. Same as ``unpermute(dx_sorted, order,
    None, n_tokens, k)``.

    Returns:
        ``dx`` ``[n_tokens, d]`` float32.
    """
    return _core.moe_permute_backward(
        as_array(dx_sorted, "dx_sorted"),
        as_array(order, "order"),
        _int("n_tokens", n_tokens),
        _int("k", k),
    )


def unpermute_backward(
    dy: np.ndarray, y_sorted: np.ndarray, order: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of :func:`unpermute` with respect to ``y_sorted`` and ``weights``.

    Args:
        dy: ``[T, d]`` float32, the gradient of the loss with respect to ``y``.
        y_sorted, order: as given to :func:`unpermute`.
        weights: ``[T, k]`` float32 as given to :func:`unpermute` (pass ones for an
            unweighted unpermute).

    Returns:
        ``(d_y_sorted, d_weights)``: ``d_y_sorted`` ``[R, d]`` float32, row ``r`` of assignment
        ``t*k+j`` is ``weights[t, j] * dy[t]``, padding rows 0; ``d_weights`` ``[T, k]``
        float32, ``dy[t] . y_sorted[r]``, 0 for dropped assignments.
    """
    return _core.moe_unpermute_backward(
        as_array(dy, "dy"),
        as_array(y_sorted, "y_sorted"),
        as_array(order, "order"),
        as_array(weights, "weights"),
    )


def grouped_matmul(x_sorted: np.ndarray, counts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each expert's block of rows times that expert's matrix.

    Args:
        x_sorted: ``[R, d_in]`` float32, expert-contiguous rows (from :func:`permute`).
        counts: ``[E]`` int32 rows per expert, non-negative, summing to R.
        w: ``[E, d_in, d_out]`` float32 expert weights.

    Returns:
        ``[R, d_out]`` float32: rows of expert ``e`` times ``w[e]``. Experts with no rows cost
        nothing.
    """
    return _core.moe_grouped_matmul(
        as_array(x_sorted, "x_sorted"), as_array(counts, "counts"), as_array(w, "w")
    )


def grouped_matmul_dx(dy: np.ndarray, counts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Gradient of :func:`grouped_matmul` with respect to ``x_sorted``.

    Args:
        dy: ``[R, d_out]`` float32; counts: ``[E]`` int32; w: ``[E, d_in, d_out]`` float32.

    Returns:
        ``[R, d_in]`` float32: rows of expert ``e`` of ``dy`` times ``w[e].T``.
    """
    return _core.moe_grouped_matmul_dx(
        as_array(dy, "dy"), as_array(counts, "counts"), as_array(w, "w")
    )


def grouped_matmul_dw(x_sorted: np.ndarray, dy: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Gradient of :func:`grouped_matmul` with respect to ``w``.

    Args:
        x_sorted: ``[R, d_in]`` float32; dy: ``[R, d_out]`` float32; counts: ``[E]`` int32.

    Returns:
        ``[E, d_in, d_out]`` float32: ``x_e.T @ dy_e`` per expert, zeros for experts with no
        rows.
    """
    return _core.moe_grouped_matmul_dw(
        as_array(x_sorted, "x_sorted"), as_array(dy, "dy"), as_array(counts, "counts")
    )


def gelu_ffn(
    x_sorted: np.ndarray, counts: np.ndarray, w1: np.ndarray, w2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GELU expert FFN in one kernel: per expert, ``gelu_tanh(x_e @ w1[e]) @ w2[e]``.

    Same result as ``grouped_matmul`` → tanh GELU → ``grouped_matmul``, but each tile of rows
    runs the whole chain on one thread (the GELU while the tile is still in cache) and all
    tiles run side by side, so both GEMMs and the GELU keep every core busy.

    Args:
        x_sorted: ``[R, d_in]`` float32, expert-contiguous rows (from :func:`permute`).
        counts: ``[E]`` int32 rows per expert, non-negative, summing to R.
        w1: ``[E, d_in, hidden]`` float32; w2: ``[E, hidden, d_out]`` float32.

    Returns:
        ``(h, a, y_sorted)``: the pre-activation ``h`` and activation ``a = gelu(h)``
        (``[R, hidden]``, what :func:`gelu_ffn_backward` needs) and ``y_sorted``
        ``[R, d_out]``.
    """
    return _core.moe_gelu_ffn(
        as_array(x_sorted, "x_sorted"),
        as_array(counts, "counts"),
        as_array(w1, "w1"),
        as_array(w2, "w2"),
    )


def gelu_ffn_backward(
    x_sorted: np.ndarray,
    counts: np.ndarray,
    w1: np.ndarray,
    w2: np.ndarray,
    h: np.ndarray,
    a: np.ndarray,
    d_y_sorted: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient of :func:`gelu_ffn`.

    Args:
        x_sorted, counts, w1, w2: as given to :func:`gelu_ffn`.
        h, a: ``[R, hidden]`` float32, what :func:`gelu_ffn` returned.
        d_y_sorted: ``[R, d_out]`` float32, the gradient with respect to ``y_sorted``.

    Returns:
        ``(d_x_sorted, d_w1, d_w2)``: ``[R, d_in]``, ``[E, d_in, hidden]`` and
        ``[E, hidden, d_out]`` float32 (zeros for experts with no rows).
    """
    return _core.moe_gelu_ffn_backward(
        as_array(x_sorted, "x_sorted"),
        as_array(counts, "counts"),
        as_array(w1, "w1"),
        as_array(w2, "w2"),
        as_array(h, "h"),
        as_array(a, "a"),
        as_array(d_y_sorted, "d_y_sorted"),
    )


def router_logits(x: np.ndarray, router_w: np.ndarray) -> np.ndarray:
    """The router's logits ``x @ router_w.T``: ``x`` ``[T, d]``, ``router_w`` ``[E, d]``
    float32 → ``[T, E]`` float32.

    Runs on rayon's threads rather than numpy's BLAS: OpenBLAS's worker threads keep
    spinning after a call and took the cores from the rayon kernels of the rest of the layer.
    """
    return _core.moe_router_logits(as_array(x, "x"), as_array(router_w, "router_w"))


def router_backward(
    d_logits: np.ndarray, x: np.ndarray, router_w: np.ndarray, d_x: np.ndarray
) -> np.ndarray:
    """Backward of :func:`router_logits`: adds ``d_logits @ router_w`` to ``d_x`` in place
    (``[T, d]`` float32, C-contiguous and writable) and returns
    ``d_router_w = d_logits.T @ x`` (``[E, d]`` float32)."""
    return _core.moe_router_backward(
        as_array(d_logits, "d_logits"),
        as_array(x, "x"),
        as_array(router_w, "router_w"),
        as_array(d_x, "d_x"),
    )
