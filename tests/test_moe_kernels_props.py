"""Property tests (hypothesis) of the MoE kernels: permute and unpermute are inverses, and
arbitrary — even inconsistent — order/counts arrays either raise ValueError or give exactly
what the numpy reference gives; never a crash or an out-of-bounds access."""

import numpy as np
import test_moe_kernels_ref as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from moecore import moe_kernels as mk

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def routings(draw):
    """(x [T, d], expert_idx [T, k], weights [T, k], E) with small, tie-prone values."""
    t = draw(st.integers(0, 20))
    d = draw(st.integers(0, 6))
    e = draw(st.integers(1, 6))
    k = draw(st.integers(1, e))
    idx = draw(st.lists(st.integers(0, e - 1), min_size=t * k, max_size=t * k))
    w = draw(st.lists(st.integers(0, 3), min_size=t * k, max_size=t * k))
    x = np.arange(t * d, dtype=np.float32).reshape(t, d) - 3
    return (
        x,
        np.array(idx, dtype=np.int32).reshape(t, k),
        (np.array(w, dtype=np.float32) / 4).reshape(t, k),
        e,
    )


@SETTINGS
@given(
    routings(),
    st.one_of(st.none(), st.integers(0, 8)),
    st.integers(1, 5),
)
def test_permute_then_unpermute_is_the_identity_on_kept_tokens(case, capacity, pad_to):
    x, idx, w, e = case
    t, k = idx.shape
    xs, order, counts = mk.permute(x, idx, e, capacity=capacity, weights=w, pad_to=pad_to)
    rxs, rorder, rcounts = ref.permute(x, idx, e, capacity, w, pad_to)
    np.testing.assert_array_equal(order, rorder)
    np.testing.assert_array_equal(counts, rcounts)
    np.testing.assert_array_equal(xs, rxs)
    # One-hot weights on each token's first kept assignment: unpermute gives x back exactly
    # for kept tokens and zeros for tokens whose assignments were all dropped.
    first = np.zeros((t, k), dtype=np.float32)
    kept_tokens = set()
    for o in sorted(order[order >= 0].tolist()):
        if o // k not in kept_tokens:
            kept_tokens.add(o // k)
            first.flat[o] = 1.0
    back = mk.unpermute(xs, order, first)
    want = np.zeros_like(x)
    rows = sorted(kept_tokens)
    want[rows] = x[rows]
    np.testing.assert_array_equal(back, want)
    # And the weighted unpermute is the reference's (small integers and quarters: exact).
    np.testing.assert_array_equal(mk.unpermute(xs, order, w), ref.unpermute(xs, order, w, t, k))


@SETTINGS
@given(
    t=st.integers(0, 6),
    k=st.integers(1, 3),
    d=st.integers(0, 3),
    raw=st.lists(st.integers(-3, 20), max_size=20),
)
def test_arbitrary_order_raises_or_matches_reference(t, k, d, raw):
    order = np.array(raw, dtype=np.int32)
    ys = np.arange(len(raw) * d, dtype=np.float32).reshape(len(raw), d)
    w = (np.arange(t * k, dtype=np.float32) + 0.5).reshape(t, k)
    dy = np.ones((t, d), dtype=np.float32)
    real = [o for o in raw if o != -1]
    valid = all(0 <= o < t * k for o in real) and len(set(real)) == len(real)
    calls = [
        lambda: mk.unpermute(ys, order, w),
        lambda: mk.permute_backward(ys, order, t, k),
        lambda: mk.unpermute_backward(dy, ys, order, w),
    ]
    for call in calls:
        try:
            out = call()
        except ValueError as err:
            assert not valid, err
            assert str(err).startswith("order[")
        else:
            assert valid
            if isinstance(out, tuple):
                r_ys, r_w = ref.unpermute_backward(dy, ys, order, w)
                np.testing.assert_array_equal(out[0], r_ys)
                np.testing.assert_array_equal(out[1], r_w)
            else:
                weights = w if call is calls[0] else None
                np.testing.assert_array_equal(out, ref.unpermute(ys, order, weights, t, k))


@SETTINGS
@given(
    counts=st.lists(st.integers(-3, 6), min_size=1, max_size=5),
    rows=st.integers(0, 15),
    d_in=st.integers(0, 4),
    d_out=st.integers(0, 4),
)
def test_arbitrary_counts_raise_or_match_reference(counts, rows, d_in, d_out):
    c = np.array(counts, dtype=np.int32)
    e = len(counts)
    x = (np.arange(rows * d_in, dtype=np.float32) % 5 - 2).reshape(rows, d_in)
    w = (np.arange(e * d_in * d_out, dtype=np.float32) % 3 - 1).reshape(e, d_in, d_out)
    dy = (np.arange(rows * d_out, dtype=np.float32) % 4).reshape(rows, d_out)
    valid = min(counts) >= 0 and sum(counts) == rows
    calls = [
        (lambda: mk.grouped_matmul(x, c, w), lambda: ref.grouped_matmul(x, c, w)),
        (lambda: mk.grouped_matmul_dx(dy, c, w), lambda: ref.grouped_matmul_dx(dy, c, w)),
        (lambda: mk.grouped_matmul_dw(x, dy, c), lambda: ref.grouped_matmul_dw(x, dy, c)),
    ]
    for kernel, reference in calls:
        try:
            out = kernel()
        except ValueError as err:
            assert not valid, err
            assert str(err).startswith("counts")
        else:
            assert valid
            np.testing.assert_array_equal(out, reference())  # small integers: exact


@SETTINGS
@given(
    t=st.integers(0, 10),
    e=st.integers(1, 9),
    k_seed=st.integers(0, 100),
    vals=st.lists(st.integers(-4, 4), min_size=90, max_size=90),
    sigmoid=st.booleans(),
)
def test_route_choice_is_the_reference_top_k_even_with_ties(t, e, k_seed, vals, sigmoid):
    k = 1 + k_seed % e
    logits = (np.array(vals[: t * e], dtype=np.float32) / 2).reshape(t, e)
    score = "sigmoid" if sigmoid else "softmax"
    idx, w, probs = mk.route(logits, k, score)
    np.testing.assert_array_equal(idx, ref.choose(probs, k))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
