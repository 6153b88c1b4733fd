"""The MoE kernels against plain numpy references (tests/test_moe_kernels_ref.py).

Tolerances are stated per test: kernels compute in float32, references in float64.
"""

import threading

import numpy as np
import pytest
import test_moe_kernels_ref as ref

from moecore import moe_kernels as mk

RNG = np.random.default_rng(1234)


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def random_idx(t, k, e, rng=RNG):
    """[T, k] distinct experts per token, as a router makes them."""
    if t == 0:
        return np.zeros((0, k), dtype=np.int32)
    return np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# route

ROUTE_CASES = [
    # T, E, k, score, with_bias, n_groups, topk_groups, normalize
    (0, 4, 2, "softmax", False, None, None, True),
    (1, 1, 1, "softmax", False, None, None, True),
    (1, 1, 1, "sigmoid", True, None, None, False),
    (5, 4, 4, "softmax", False, None, None, True),  # k = E
    (37, 8, 2, "softmax", False, None, None, True),
    (37, 8, 1, "softmax", False, None, None, False),  # Switch
    (50, 16, 3, "sigmoid", True, None, None, True),  # DeepSeek-V3 style
    (64, 64, 8, "sigmoid", True, 8, 4, True),  # group-limited
    (20, 12, 2, "softmax", False, 12, 3, True),  # groups of one expert (top-1 group score)
    (20, 12, 6, "softmax", True, 4, 2, False),  # k = everything the kept groups hold
]


@pytest.mark.parametrize(("t", "e", "k", "score", "with_bias", "ng", "tg", "norm"), ROUTE_CASES)
def test_route_matches_numpy(t, e, k, score, with_bias, ng, tg, norm):
    logits = randn(t, e, scale=2.0)
    bias = randn(e, scale=0.1) if with_bias else None
    idx, w, probs = mk.route(logits, k, score, bias, n_groups=ng, topk_groups=tg, normalize=norm)
    assert (idx.dtype, w.dtype, probs.dtype) == (np.int32, np.float32, np.float32)
    assert idx.shape == (t, k) and w.shape == (t, k) and probs.shape == (t, e)
    p64 = ref.scores(logits, score)
    # probs: float32 softmax/sigmoid vs float64, rtol 1e-5
    np.testing.assert_allclose(probs, p64, rtol=1e-5, atol=1e-7)
    # choice: top-k of (the kernel's float32 probs + bias), so near-ties cannot flip it
    choice = probs + bias if bias is not None else probs
    np.testing.assert_array_equal(idx, ref.choose(choice, k, ng, tg))
    # weights: unbiased float64 probs of the chosen experts, rtol 1e-5
    np.testing.assert_allclose(w, ref.route_weights(p64, idx, norm), rtol=1e-5, atol=1e-7)


def test_route_ties_go_to_lower_index_and_bias_only_steers():
    logits = np.zeros((3, 6), dtype=np.float32)
    idx, w, _ = mk.route(logits, 3)
    assert idx.tolist() == [[0, 1, 2]] * 3
    np.testing.assert_allclose(w, 1 / 3, rtol=1e-6)
    bias = np.array([0, 0, 0, 0, 0, 1], dtype=np.float32)
    idx, w, _ = mk.route(logits, 2, "sigmoid", bias, normalize=False)
    assert idx.tolist() == [[5, 0]] * 3
    np.testing.assert_array_equal(w, 0.5)  # sigmoid(0), exactly, whatever the bias


def test_route_is_stable_for_extreme_logits():
    logits = np.array([[1e4, -1e4, 0.0], [-88.0, -100.0, -104.0]], dtype=np.float32)
    for score in ("softmax", "sigmoid"):
        idx, w, probs = mk.route(logits, 2, score)
        assert np.isfinite(probs).all() and np.isfinite(w).all()
        np.testing.assert_allclose(probs, ref.scores(logits, score), rtol=1e-5, atol=1e-30)
        assert idx[0, 0] == 0


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("t", "e", "k"), [(1, 1, 1), (6, 5, 2), (4, 8, 8)])
def test_route_backward_matches_float64_finite_differences(score, normalize, t, e, k):
    logits = randn(t, e)
    g = randn(t, k)
    idx, _, probs = mk.route(logits, k, score, normalize=normalize)
    d = mk.route_backward(g, idx, probs, score, normalize)
    assert d.shape == (t, e) and d.dtype == np.float32
    fd = ref.route_backward_fd(logits, idx, g, score, normalize)
    # float32 kernel vs float64 central differences (h = 1e-6): atol 2e-6
    np.testing.assert_allclose(d, fd, rtol=1e-4, atol=2e-6)


def test_route_backward_of_empty_batch():
    d = mk.route_backward(
        np.zeros((0, 2), np.float32), np.zeros((0, 2), np.int32), np.zeros((0, 4), np.float32)
    )
    assert d.shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# permute / unpermute

PERMUTE_CASES = [
    # T, d, E, k, capacity, pad_to
    (0, 8, 4, 2, None, 1),
    (1, 3, 1, 1, None, 1),  # E = 1
    (1, 5, 4, 4, None, 1),  # k = E
    (10, 7, 8, 2, None, 1),  # experts with zero tokens
    (100, 16, 8, 2, None, 1),
    (100, 16, 8, 2, 20, 1),  # capacity dropping
    (100, 16, 8, 2, None, 16),  # padding
    (57, 9, 6, 3, 25, 8),  # both
    (30, 4, 3, 1, 0, 4),  # capacity 0 drops everything
    (12, 0, 3, 2, None, 2),  # d = 0
]


def make_permute_case(t, d, e, k, skew=True):
    x = randn(t, d)
    if skew and t:  # skewed load so some experts overflow and some get nothing
        idx = random_idx(t, k, e)
        idx[: t // 2, 0] = 0
        idx = np.where(idx == e - 1, 0, idx) if e > k + 1 else idx
        # keep rows distinct
        for row in idx:
            if len(set(row.tolist())) < k:
                row[:] = RNG.permutation(e)[:k]
    else:
        idx = random_idx(t, k, e)
    # weights from a few values so ties exercise the tie rule
    w = (RNG.integers(1, 5, size=(t, k)) / 4).astype(np.float32)
    return x, idx.astype(np.int32), w


@pytest.mark.parametrize(("t", "d", "e", "k", "cap", "pad"), PERMUTE_CASES)
def test_permute_matches_numpy(t, d, e, k, cap, pad):
    x, idx, w = make_permute_case(t, d, e, k)
    xs, order, counts = mk.permute(x, idx, e, capacity=cap, weights=w, pad_to=pad)
    rxs, rorder, rcounts = ref.permute(x, idx, e, cap, w, pad)
    assert (xs.dtype, order.dtype, counts.dtype) == (np.float32, np.int32, np.int32)
    np.testing.assert_array_equal(order, rorder)
    np.testing.assert_array_equal(counts, rcounts)
    np.testing.assert_array_equal(xs, rxs)  # a gather: exact
    assert counts.sum() == xs.shape[0] == order.shape[0]
    assert xs.flags.c_contiguous and xs.flags.writeable


@pytest.mark.parametrize(("t", "d", "e", "k", "cap", "pad"), PERMUTE_CASES)
def test_unpermute_and_backwards_match_numpy(t, d, e, k, cap, pad):
    x, idx, w = make_permute_case(t, d, e, k)
    xs, order, _ = mk.permute(x, idx, e, capacity=cap, weights=w, pad_to=pad)
    ys = randn(*xs.shape)
    # weighted sum of at most k float32 products vs float64: rtol 1e-6, atol 1e-6
    y = mk.unpermute(ys, order, w)
    np.testing.assert_allclose(y, ref.unpermute(ys, order, w, t, k), rtol=1e-6, atol=1e-6)
    assert y.shape == (t, d) and y.dtype == np.float32
    dx = mk.permute_backward(ys, order, t, k)
    np.testing.assert_allclose(dx, ref.unpermute(ys, order, None, t, k), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dx, mk.unpermute(ys, order, None, n_tokens=t, k=k))
    dy = randn(t, d)
    d_ys, d_w = mk.unpermute_backward(dy, ys, order, w)
    r_ys, r_w = ref.unpermute_backward(dy, ys, order, w)
    np.testing.assert_allclose(d_ys, r_ys, rtol=1e-6, atol=1e-6)
    # dot products over d <= 16 float32 terms: rtol 1e-5, atol 1e-5
    np.testing.assert_allclose(d_w, r_w, rtol=1e-5, atol=1e-5)
    dropped = np.setdiff1d(np.arange(t * k), order[order >= 0])
    assert (d_w.ravel()[dropped] == 0).all()
    assert (d_ys[order < 0] == 0).all()


def test_unpermute_backward_matches_finite_differences():
    # unpermute is linear in y_sorted and in weights, so a float64 directional derivative of
    # <dy, y> is exact up to rounding: check both gradients against it.
    t, d, e, k = 9, 5, 4, 2
    x, idx, w = make_permute_case(t, d, e, k, skew=False)
    xs, order, _ = mk.permute(x, idx, e, weights=w, pad_to=4)
    ys, dy = randn(*xs.shape), randn(t, d)
    d_ys, d_w = mk.unpermute_backward(dy, ys, order, w)
    v_ys, v_w = randn(*ys.shape), randn(t, k)

    def loss(ys_, w_):
        return float((dy.astype(np.float64) * ref.unpermute(ys_, order, w_, t, k)).sum())

    h = 1e-3
    fd_ys = (loss(ys + h * v_ys, w) - loss(ys - h * v_ys, w)) / (2 * h)
    fd_w = (loss(ys, w + h * v_w) - loss(ys, w - h * v_w)) / (2 * h)
    # float32 inputs perturbed by h: rtol 1e-3
    assert np.isclose((d_ys * v_ys).sum(), fd_ys, rtol=1e-3, atol=1e-3)
    assert np.isclose((d_w * v_w).sum(), fd_w, rtol=1e-3, atol=1e-3)


def test_permute_then_unpermute_with_unit_weights_gives_k_times_x():
    t, d, e, k = 300, 12, 8, 2
    x = randn(t, d)
    idx = random_idx(t, k, e)
    xs, order, _ = mk.permute(x, idx, e, pad_to=8)
    np.testing.assert_array_equal(mk.permute_backward(xs, order, t, k), 2 * x)  # x + x: exact


def test_dropped_assignments_are_the_flat_indices_missing_from_order():
    t, d, e, k = 64, 4, 4, 2
    x, idx, w = make_permute_case(t, d, e, k)
    _, order, counts = mk.permute(x, idx, e, capacity=10, weights=w)
    kept = order[order >= 0]
    assert len(np.unique(kept)) == len(kept)
    assert (counts <= 10).all()
    per_expert = np.bincount(idx.ravel(), minlength=e)
    assert t * k - len(kept) == np.maximum(per_expert - 10, 0).sum()


# ---------------------------------------------------------------------------------------------
# grouped matmul

GROUPED_CASES = [
    # counts, d_in, d_out
    ([0], 4, 3),  # R = 0
    ([1], 1, 1),
    ([5, 0, 0, 7], 8, 3),  # experts with zero rows
    ([0, 0, 33], 17, 9),
    ([64, 1, 130, 0, 31], 32, 48),
    ([100, 150, 90, 170, 120, 80, 110, 104], 96, 160),
    ([4, 4], 0, 5),  # d_in = 0
    ([4, 4], 5, 0),  # d_out = 0
]


@pytest.mark.parametrize(("counts", "d_in", "d_out"), GROUPED_CASES)
def test_grouped_matmul_and_backwards_match_numpy(counts, d_in, d_out):
    counts = np.array(counts, dtype=np.int32)
    r, e = int(counts.sum()), len(counts)
    x, w, dy = randn(r, d_in), randn(e, d_in, d_out), randn(r, d_out)
    # float32 GEMM vs float64: rtol 1e-4 plus atol 1e-4 * sqrt(depth) for cancellation
    y = mk.grouped_matmul(x, counts, w)
    assert y.shape == (r, d_out) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref.grouped_matmul(x, counts, w), rtol=1e-4, atol=1e-4 * 10)
    dx = mk.grouped_matmul_dx(dy, counts, w)
    assert dx.shape == (r, d_in)
    np.testing.assert_allclose(dx, ref.grouped_matmul_dx(dy, counts, w), rtol=1e-4, atol=1e-3)
    dw = mk.grouped_matmul_dw(x, dy, counts)
    assert dw.shape == (e, d_in, d_out)
    np.testing.assert_allclose(dw, ref.grouped_matmul_dw(x, dy, counts), rtol=1e-4, atol=2e-3)
    for ex in np.nonzero(counts == 0)[0]:
        assert (dw[ex] == 0).all()


def test_grouped_matmul_at_benchmark_shapes():
    counts = np.array([1030, 990, 1100, 950, 1010, 1050, 980, 1082], dtype=np.int32)
    x, w = randn(int(counts.sum()), 256), randn(8, 256, 512, scale=0.05)
    y = mk.grouped_matmul(x, counts, w)
    # depth 256: rtol 1e-4, atol 1e-4
    np.testing.assert_allclose(y, ref.grouped_matmul(x, counts, w), rtol=1e-4, atol=1e-4)


def test_kernels_run_concurrently_from_threads():
    # The GIL is released inside: two threads at once must still get exact, separate answers.
    counts = np.array([300, 200], dtype=np.int32)
    xs = [randn(500, 64) for _ in range(4)]
    w = randn(2, 64, 32)
    want = [mk.grouped_matmul(x, counts, w) for x in xs]
    got: list = [None] * 4

    def work(i):
        got[i] = mk.grouped_matmul(xs[i], counts, w)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_full_expert_layer_chains_the_kernels():
    # route -> permute -> grouped_matmul -> unpermute equals the dense per-token computation.
    t, d, e, k, h = 40, 16, 4, 2, 24
    x, logits, w = randn(t, d), randn(t, e), randn(e, d, h)
    idx, wts, _ = mk.route(logits, k)
    xs, order, counts = mk.permute(x, idx, e, pad_to=4)
    y = mk.unpermute(mk.grouped_matmul(xs, counts, w), order, wts)
    want = np.zeros((t, h))
    for tok in range(t):
        for j in range(k):
            want[tok] += wts[tok, j] * (x[tok].astype(np.float64) @ w[idx[tok, j]])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
