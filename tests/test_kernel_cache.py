"""The kernels' buffer cache (moecore.pool.kernel_cache_info and friends): large Rust-side
outputs are reused after they are freed, results stay right, and the limit is obeyed."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from moecore import _core, pool

MIB = 1 << 20


@pytest.fixture
def fresh_cache():
    limit = pool.kernel_cache_info()["limit_bytes"]
    pool.release_kernel_cache()
    yield
    pool.set_kernel_cache_limit(limit)


def _gelu_reference(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)))


def test_a_freed_output_serves_the_next_call_and_results_stay_right(fresh_cache):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(2 * MIB // 4 * 2).astype(np.float32)  # 4 MiB of float32
    y = _core.fused_gelu(a)
    np.testing.assert_allclose(y, _gelu_reference(a), rtol=1e-5, atol=1e-6)
    del y  # its 4 MiB block is now kept
    info = pool.kernel_cache_info()
    assert info["kept_bytes"] >= 4 * MIB
    hits = info["hits"]
    b = -a[::-1].copy()
    y = _core.fused_gelu(b)  # same size: served from the kept block, every element rewritten
    assert pool.kernel_cache_info()["hits"] == hits + 1
    np.testing.assert_allclose(y, _gelu_reference(b), rtol=1e-5, atol=1e-6)


def test_the_limit_bounds_what_is_kept(fresh_cache):
    x = np.ones(MIB, dtype=np.float32)  # 4 MiB outputs
    pool.set_kernel_cache_limit(6 * MIB)
    outs = [_core.fused_gelu(x) for _ in range(3)]
    del outs
    info = pool.kernel_cache_info()
    assert info["limit_bytes"] == 6 * MIB
    assert 4 * MIB <= info["kept_bytes"] <= 6 * MIB
    pool.set_kernel_cache_limit(0)
    assert pool.kernel_cache_info()["kept_bytes"] == 0
    y = _core.fused_gelu(x)
    del y
    assert pool.kernel_cache_info()["kept_bytes"] == 0, "a limit of 0 keeps nothing"


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="0 or more"):
        pool.set_kernel_cache_limit(-1)
    with pytest.raises(TypeError, match="int"):
        pool.set_kernel_cache_limit("64")  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "ok"), [("64", True), ("lots", False)])
def test_the_environment_variable_sets_the_limit(value, ok):
    env = dict(os.environ, MOECORE_KERNEL_CACHE_MB=value)
    code = "from moecore import pool; print(pool.kernel_cache_info()['limit_bytes'])"
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    if ok:
        assert run.returncode == 0, run.stderr
        assert int(run.stdout) == 64 * MIB
    else:
        assert run.returncode != 0
        assert "MOECORE_KERNEL_CACHE_MB" in run.stderr and "whole number of MiB" in run.stderr
