"""moecore asks OpenBLAS's idle threads to sleep at once, before numpy loads, unless the
user chose or numpy came first (speed is measured in benches/py/moe_kernels.py)."""

from __future__ import annotations

import json
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


# numpy first, its OpenBLAS pool running; then moecore's restart, called directly so the
# worker threads can be counted around it (/proc/self/task: one entry per thread).
RESTART = """
import json, os
import numpy as np
from moecore import _blas_env
tasks = lambda: len(os.listdir("/proc/self/task"))
a = np.random.default_rng(0).standard_normal((300, 300))
want = a @ a
before = tasks()
libs = _blas_env.restart_blas_threads()
after = tasks()
got = a @ a
print(json.dumps({"libs": libs, "at_import": _blas_env.RESTARTED, "before": before,
    "after": after, "again": tasks(), "same": bool((got == want).all()),
    "env": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.skipif(
    sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) < 2,
    reason="OpenBLAS starts no worker thread on one core: nothing to count",
)
def test_numpy_first_gets_its_blas_pool_restarted() -> None:
    facts = json.loads(_run("import numpy\n" + RESTART, OPENBLAS_NUM_THREADS="2"))
    if not facts["libs"]:
        pytest.skip("numpy is not linked against an OpenBLAS exporting the restart symbols")
    assert facts["at_import"] == facts["libs"]  # import moecore after numpy restarted it too
    assert facts["before"] - facts["after"] == 1  # the one worker of a 2-thread pool stopped
    assert facts["again"] == facts["before"]  # the next product started it again
    assert facts["same"]  # and computes what it computed before
    assert facts["env"] is None  # the process environment is left as it was


@pytest.mark.parametrize("env", [{"MOECORE_BLAS_RESTART": "0"}, {"OPENBLAS_THREAD_TIMEOUT": "9"}])
def test_the_restart_is_skipped_when_opted_out_or_the_user_chose(env: dict[str, str]) -> None:
    facts = json.loads(_run("import numpy\n" + RESTART, OPENBLAS_NUM_THREADS="2", **env))
    assert facts["libs"] == [] and facts["at_import"] == []
    assert facts["before"] == facts["after"]


def test_the_restart_is_skipped_while_another_thread_runs() -> None:
    # The other thread could be inside a BLAS call: stopping the pool would lose its work.
    code = (
        "import threading, numpy\nstop = threading.Event()\n"
        "t = threading.Thread(target=stop.wait); t.start()\n"
        "from moecore import _blas_env\nprint(_blas_env.RESTARTED, _blas_env.restart_blas_threads())\n"
        "stop.set(); t.join()"
    )
    assert _run(code, OPENBLAS_NUM_THREADS="2") == "[] []"
