"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
from corpora import write_stdlib_corpus


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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 400 kB corpus file (a slice of the standard library's source) for training tests."""
    return write_stdlib_corpus(tmp_path_factory.mktemp("data"), 400_000)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``mpi`` skips, saying why, when MPI is missing — but fails when
    ``MOECORE_TEST_MPI`` is set (CI sets it to the MPI it installed: a CI whose MPI went
    missing must not pass by skipping)."""
    if item.get_closest_marker("mpi") is None:
        return
    from parallel_harness import mpi_missing

    missing = mpi_missing()
    if missing is None:
        return
    wanted = os.environ.get("MOECORE_TEST_MPI")
    if wanted:
        pytest.fail(f"MOECORE_TEST_MPI={wanted} but {missing}", pytrace=False)
    pytest.skip(missing)
