"""Plain-numpy (float64 where arithmetic happens) references of the MoE kernels, for tests.

Written for clarity, not speed: loops and ``np.add.at``, nothing shared with the kernels.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def scores(logits: np.ndarray, score: str) -> np.ndarray:
    """Softmax or sigmoid of float32 logits, computed in float64."""
    x = logits.astype(np.float64)
    if score == "softmax":
        z = np.exp(x - x.max(axis=1, keepdims=True)) if x.size else x
        return z / z.sum(axis=1, keepdims=True) if x.size else x
    return expit(x)


def choose(choice: np.ndarray, k: int, n_groups=None, topk_groups=None) -> np.ndarray:
    """Top-k of each row of ``choice`` (descending, ties to the lower index), group-limited."""
    t, e = choice.shape
    out = np.zeros((t, k), dtype=np.int32)
    for row in range(t):
        c = choice[row]
        allowed = np.ones(e, dtype=bool)
        if n_groups is not None:
            size = e // n_groups
            groups = c.reshape(n_groups, size)
            top = min(size, 2)
            # sum of the best `top` scores of each group, added in descending order
            best = -np.sort(-groups, axis=1)[:, :top]
            gscore = best[:, 0].copy()
            for i in range(1, top):
                gscore = gscore + best[:, i]
            keep = np.lexsort((np.arange(n_groups), -gscore))[:topk_groups]
            allowed[:] = False
            for g in keep:
                allowed[g * size : (g + 1) * size] = True
        masked = np.where(allowed, c, -np.inf)
        out[row] = np.lexsort((np.arange(e), -masked))[:k]
    return out


def route_weights(p64: np.ndarray, idx: np.ndarray, normalize: bool) -> np.ndarray:
    w = np.take_along_axis(p64, idx.astype(np.int64), axis=1)
    if normalize and w.size:
        w = w / w.sum(axis=1, keepdims=True)
    return w


def route_loss(logits64: np.ndarray, idx, g, score: str, normalize: bool) -> float:
    """sum(g * weights(logits)) with the choice held fixed, all in float64."""
    if score == "softmax":
        z = np.exp(logits64 - logits64.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
    else:
        p = expit(logits64)
    return float((g.astype(np.float64) * route_weights(p, idx, normalize)).sum())


def route_backward_fd(logits, idx, g, score, normalize, h=1e-6) -> np.ndarray:
    """Central finite differences of :func:`route_loss` in float64."""
    x0 = logits.astype(np.float64)
    grad = np.zeros_like(x0)
    for i in np.ndindex(*x0.shape):
        xp, xm = x0.copy(), x0.copy()
        xp[i] += h
        xm[i] -= h
        grad[i] = (
            route_loss(xp, idx, g, score, normalize) - route_loss(xm, idx, g, score, normalize)
        ) / (2 * h)
    return grad


def permute(x, idx, n_experts, capacity=None, weights=None, pad_to=1):
    k = idx.shape[1]
    flat = idx.ravel()
    order: list[int] = []
    counts = []
    for e in range(n_experts):
        mine = np.nonzero(flat == e)[0]
        if capacity is not None and len(mine) > capacity:
            w = weights.ravel()[mine]
            ranked = np.lexsort((mine, -w))  # weight descending, then earlier first
            mine = np.sort(mine[ranked[:capacity]])
        pad = -len(mine) % pad_to
        order.extend(int(m) for m in mine)
        order.extend([-1] * pad)
        counts.append(len(mine) + pad)
    order_a = np.array(order, dtype=np.int64)
    x_sorted = np.zeros((len(order), x.shape[1]), dtype=np.float32)
    real = order_a >= 0
    x_sorted[real] = x[order_a[real] // k]
    return x_sorted, order_a.astype(np.int32), np.array(counts, dtype=np.int32)


def unpermute(y_sorted, order, weights, n_tokens, k):
    y = np.zeros((n_tokens, y_sorted.shape[1]), dtype=np.float64)
    real = order >= 0
    o = order[real].astype(np.int64)
    w = np.ones(n_tokens * k) if weights is None else weights.astype(np.float64).ravel()
    np.add.at(y, o // k, w[o][:, None] * y_sorted[real].astype(np.float64))
    return y


def unpermute_backward(dy, y_sorted, order, weights):
    t, k = weights.shape
    d_ys = np.zeros(y_sorted.shape, dtype=np.float64)
    d_w = np.zeros(t * k, dtype=np.float64)
    for r, o in enumerate(order):
        if o >= 0:
            d_ys[r] = weights.ravel()[o] * dy[o // k].astype(np.float64)
            d_w[o] = dy[o // k].astype(np.float64) @ y_sorted[r].astype(np.float64)
    return d_ys, d_w.reshape(t, k)


def blocks(counts) -> list[slice]:
    ends = np.cumsum(counts)
    return [slice(int(end - c), int(end)) for c, end in zip(counts, ends, strict=True)]


def grouped_matmul(x_sorted, counts, w):
    out = np.zeros((x_sorted.shape[0], w.shape[2]))
    for e, s in enumerate(blocks(counts)):
        out[s] = x_sorted[s].astype(np.float64) @ w[e].astype(np.float64)
    return out


def grouped_matmul_dx(dy, counts, w):
    out = np.zeros((dy.shape[0], w.shape[1]))
    for e, s in enumerate(blocks(counts)):
        out[s] = dy[s].astype(np.float64) @ w[e].astype(np.float64).T
    return out


def grouped_matmul_dw(x_sorted, dy, counts):
    out = np.zeros((len(counts), x_sorted.shape[1], dy.shape[1]))
    for e, s in enumerate(blocks(counts)):
        out[e] = x_sorted[s].astype(np.float64).T @ dy[s].astype(np.float64)
    return out


# The references are checked on hand-computed cases, so kernel tests lean on tested ground.


def test_reference_permute_by_hand():
    idx = np.array([[1, 0], [1, 2], [0, 1]], dtype=np.int32)
    x = np.array([[10.0], [11.0], [12.0]], dtype=np.float32)
    w = np.array([[0.1, 0.9], [0.5, 0.5], [0.2, 0.3]], dtype=np.float32)
    xs, order, counts = permute(x, idx, 4, capacity=2, weights=w, pad_to=2)
    # expert 1 has flats 0 (0.1), 2 (0.5), 5 (0.3): drops flat 0
    assert order.tolist() == [1, 4, 2, 5, 3, -1]
    assert counts.tolist() == [2, 2, 2, 0]
    assert xs.ravel().tolist() == [10.0, 12.0, 11.0, 12.0, 11.0, 0.0]


def test_reference_route_by_hand():
    c = np.array([[0.1, 0.3, 0.3, 0.2, 0.9, 0.0]])
    assert choose(c, 2).tolist() == [[4, 1]]
    # groups {0,1} 0.4, {2,3} 0.5, {4,5} 0.9: best one group is {4,5}
    assert choose(c, 2, n_groups=3, topk_groups=1).tolist() == [[4, 5]]
    assert choose(c, 3, n_groups=3, topk_groups=2).tolist() == [[4, 2, 3]]
