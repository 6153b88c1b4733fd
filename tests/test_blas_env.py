"""moecore asks OpenBLAS's idle threads to sleep at once, before numpy loads, unless the
user chose or numpy came first (speed is measured in benches/py/moe_kernels.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = "import os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return proc.stdout.strip()


def test_import_sets_the_timeout_before_numpy_loads() -> None:
    # moecore's names load lazily (runtime faces stay light): touch one to load numpy.
    code = "import moecore, sys; moecore.Tensor; assert 'numpy' in sys.modules; " + SHOW
    assert _run(code) == "4"


@pytest.mark.parametrize("value", ["12", "30"])
def test_a_value_the_user_set_is_kept(value: str) -> None:
    assert _run("import moecore; " + SHOW, OPENBLAS_THREAD_TIMEOUT=value) == value


def test_nothing_changes_when_numpy_came_first() -> None:
    code = (
        "import numpy, moecore; from moecore import _blas_env; print(_blas_env.prefer_sleeping_blas_threads()); "
        + SHOW
    )
    assert _run(code).split() == ["False", "None"]
