"""Imported before torch, moecore.integrations.torch makes torch's OpenMP workers sleep at once
(OMP_WAIT_POLICY=PASSIVE), never over the user's choice, not after torch loaded, and not when
opted out. Each case in a fresh interpreter (libgomp reads the variable once, at load)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the torch integration tests need PyTorch")

SHOW = "import os; print(m.OPENMP_PASSIVE, os.environ.get('OMP_WAIT_POLICY'))"


def _run(code, **env):
    base = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MOECORE_OMP_PASSIVE")
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize(
    ("code", "env", "want"),
    [
        ("import moecore.integrations.torch as m; import torch; " + SHOW, {}, ["True", "PASSIVE"]),
        ("import torch; import moecore.integrations.torch as m; " + SHOW, {}, ["False", "None"]),
        (
            "import moecore.integrations.torch as m; " + SHOW,
            {"OMP_WAIT_POLICY": "ACTIVE"},
            ["False", "ACTIVE"],
        ),
        (
            "import moecore.integrations.torch as m; " + SHOW,
            {"MOECORE_OMP_PASSIVE": "0"},
            ["False", "None"],
        ),
        (
            "import torch; import moecore.integrations.torch as m; " + SHOW,
            {"OMP_WAIT_POLICY": "passive"},
            ["True", "passive"],
        ),
    ],
    ids=["moecore-first", "torch-first", "user-active", "opted-out", "user-passive"],
)
def test_wait_policy(code, env, want):
    assert _run(code, **env) == want
