"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cupy():
    """CuPy with at least one CUDA device; otherwise the test skips, saying why."""
    cp = pytest.importorskip("cupy", reason="CuPy is not installed (pip install moecore[gpu])")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        pytest.skip(f"no CUDA device: {exc}")
    if n < 1:
        pytest.skip("no CUDA device")
    return cp
