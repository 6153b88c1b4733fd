"""Top-k selection (exact and sampled) against numpy references."""

import numpy as np
import pytest

from moecore import _core
from moecore.compress import TopK


def reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest |x|, ties to the lower index, as increasing indices."""
    order = np.lexsort((np.arange(x.size), -np.abs(x.astype(np.float64))))
    return np.sort(order[:k]).astype(np.uint32)


def argpartition_magnitudes(x: np.ndarray, k: int) -> np.ndarray:
    """The magnitudes numpy.argpartition selects (the set of values, whatever ties it broke)."""
    a = np.abs(x)
    return np.sort(a[np.argpartition(a, a.size - k)[a.size - k :]])


SIZES = [1, 2, 3, 7, 16, 17, 100, 1000, 4097, 65536, 65537, 200_003]


@pytest.mark.parametrize("method", ["exact", "sampled"])
@pytest.mark.parametrize("n", SIZES)
def test_matches_argpartition_with_tie_rule(method, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    # Rounding creates many exact ties, so the tie rule matters.
    x_ties = (np.round(x * 4) / 4).astype(np.float32)
    for data in (x, x_ties):
        for k in sorted({1, 2, max(1, n // 100), n // 3, n // 2 + 1, n - 1, n} - {0}):
            if k > n:
                continue
            got = _core.compress_select(data, k, method=method, seed=7)
            assert got.dtype == np.uint32
            np.testing.assert_array_equal(got, reference_topk(data, k))
            np.testing.assert_array_equal(
                np.sort(np.abs(data[got])), argpartition_magnitudes(data, k)
            )


@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_all_equal_values_take_the_first_k(method):
    for n in (1, 5, 70_000, 300_000):
        x = np.full(n, -0.5, dtype=np.float32)
        k = max(1, n // 10)
        np.testing.assert_array_equal(
            _core.compress_select(x, k, method=method), np.arange(k, dtype=np.uint32)
        )
    z = np.zeros(100_000, dtype=np.float32)
    z[[5, 99_999]] = [1.0, -1.0]
    np.testing.assert_array_equal(_core.compress_select(z, 3, method=method), [0, 5, 99_999])


@pytest.mark.parametrize("method", ["exact", "sampled"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_raises_value_error_naming_the_index(method, bad):
    x = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)
    x[123_457] = bad
    with pytest.raises(ValueError, match=r"non-finite value .* at index 123457"):
        _core.compress_select(x, 3000, method=method)
    with pytest.raises(ValueError, match="123457"):
        TopK(0.01, method=method, error_feedback=False).compress(x)


def _energy(x, idx):
    return float(np.sum(x[idx].astype(np.float64) ** 2))


@pytest.mark.parametrize("dist", ["gaussian", "laplace", "student_t2"])
@pytest.mark.parametrize("ratio", [0.001, 0.01])
def test_sampled_gives_exactly_k_and_captures_the_energy(dist, ratio):
    rng = np.random.default_rng(42)
    n = 1_000_000
    x = {
        "gaussian": lambda: rng.standard_normal(n),
        "laplace": lambda: rng.laplace(size=n),
        "student_t2": lambda: rng.standard_t(2, size=n),
    }[dist]().astype(np.float32)
    k = int(ratio * n)
    exact = _core.compress_select(x, k, method="exact")
    for seed in range(3):
        got = _core.compress_select(x, k, method="sampled", seed=seed)
        assert got.size == k
        assert np.all(np.diff(got.astype(np.int64)) > 0)
        assert _energy(x, got) >= 0.99 * _energy(x, exact)
    loose = _core.compress_select(x, k, method="sampled", exact_k=False)
    assert k <= loose.size <= int(np.ceil(1.3 * k))
    assert _energy(x, loose) >= _energy(x, exact)


def test_sampled_is_deterministic_given_a_seed():
    x = np.random.default_rng(1).laplace(size=500_000).astype(np.float32)
    a = _core.compress_select(x, 5000, method="sampled", seed=3, exact_k=False)
    b = _core.compress_select(x, 5000, method="sampled", seed=3, exact_k=False)
    np.testing.assert_array_equal(a, b)


def test_bad_k_and_method():
    x = np.ones(10, dtype=np.float32)
    with pytest.raises(ValueError, match="k = 11 is out of range"):
        _core.compress_select(x, 11)
    with pytest.raises(ValueError, match="method must be"):
        _core.compress_select(x, 1, method="fast")
