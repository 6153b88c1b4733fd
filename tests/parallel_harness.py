"""The proof every parallel layout owes: its N-rank run equals a reference run.

``moecore train`` runs twice on the same data and configuration — once as the reference
(one process, or a simpler layout), once on N ranks — with ``param_checksum = true``, so
every step's ``metrics.jsonl`` record holds the loss, the gradient norm (before clipping)
and, for every tensor of the model (experts gathered over their ranks), the float64 sum
and sum of squares. :func:`assert_runs_agree` compares the two runs step by step and names
the first step and quantity that differ beyond a named :class:`Tolerance`.

Usage (see ``tests/test_dist_mpi.py``)::

    ref = train_run(tmp_path / "ref", 1, args)
    got = train_run(tmp_path / "ep2", 2, [*args, "--ep", "2"])
    assert_runs_agree(ref, got, EXACT_UP_TO_ROUNDING)

The launch helpers (:func:`mpiexec`, :func:`launch`, :func:`entry`) run every MPI job in its
own process session, killed as a whole on timeout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moecore.distributed.launch import mpi_family


def _find_mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


MPIEXEC = _find_mpiexec()
LAUNCHER = None if MPIEXEC is None else mpi_family(MPIEXEC)


def mpi_missing() -> str | None:
    """Why the MPI tests cannot run here (None when they can)."""
    if MPIEXEC is None:
        return "mpiexec not found (pip install 'moecore[mpi]')"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install 'moecore[mpi]')"
    return None


def _launcher_flags() -> list[str]:
    """Open MPI's launcher refuses more ranks than cores (the 3- and 4-rank tests on a 2-core
    machine) and, unless told, running as root (CI containers); MPICH's Hydra does neither."""
    if LAUNCHER != "Open MPI":
        return []
    flags = ["--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


def mpiexec(n: int) -> list[str]:
    """The command prefix that starts ``n`` ranks."""
    return [str(MPIEXEC), *_launcher_flags(), "-n", str(n)]


def entry() -> list[str]:
    """``moecore`` as a command: the installed script, else the module."""
    script = Path(sys.executable).parent / "moecore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moecore.cli"]


def launch(cmd: list[str], timeout: float = 120.0) -> tuple[int, str, float]:
    """Runs ``cmd`` (an ``mpiexec`` line, or one process) in its own session, stdin closed,
    one BLAS thread per rank; returns (exit code, stdout+stderr, seconds). On timeout every
    process of the session is killed (not only ``mpiexec``: its ranks would be left
    running) and the test fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{out}")
    return proc.returncode, out, time.monotonic() - t0


def cli(n: int, args: list[str], timeout: float = 300.0) -> str:
    """``moecore <args>``, under ``mpiexec -n n`` when n > 1; asserts success, returns the
    output."""
    cmd = [*mpiexec(n), *entry(), *args] if n > 1 else [*entry(), *args]
    code, out, _ = launch(cmd, timeout)
    assert code == 0, out
    return out


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Rank 0's metrics records of a run."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


#: Reference runs already made in this session: (ranks, arguments, MPI) → run folder.
_REFERENCES: dict[tuple[int, tuple[str, ...], str], Path] = {}


def train_run(
    out: Path, n: int, args: list[str], timeout: float = 300.0, reference: bool = False
) -> list[dict[str, Any]]:
    """``moecore train --out out <args> --set param_checksum=true`` on ``n`` ranks; returns
    its metrics records (one per step).

    ``reference=True`` marks a run that only serves as what others are compared with (the
    single-process or plain data-parallel curve): when the session already made one with
    the same ranks, arguments and MPI, its folder is copied to ``out`` instead of training
    again (the runs are deterministic). Never for a run under test."""
    key = (n, tuple(args), os.environ.get("MOECORE_TEST_MPI", ""))
    if reference and key in _REFERENCES and _REFERENCES[key].is_dir():
        shutil.copytree(_REFERENCES[key], out)
        return read_records(out)
    cli(n, ["train", "--out", str(out), *args, "--set", "param_checksum=true"], timeout)
    if reference:
        _REFERENCES[key] = out
    return read_records(out)


@dataclass(frozen=True)
class Tolerance:
    """How far a run may be from its reference at any step, and why.

    Attributes:
        name: what the tolerance is called in failure messages.
        loss: absolute difference of the step's mean loss.
        grad_norm: difference of the gradient norm relative to the reference's.
        params: per tensor, the difference of Σx relative to the reference's ‖x‖₂ and of
            Σx² relative to the reference's Σx² (float32 rounding of δ per element moves
            both by about δ).
    """

    name: str
    loss: float
    grad_norm: float
    params: float


def _differences(ref: dict[str, Any], got: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(quantity, measured difference, detail) for one step."""
    out = [
        ("loss", abs(got["loss"] - ref["loss"]), f"{ref['loss']!r} vs {got['loss']!r}"),
        (
            "grad_norm",
            abs(got["grad_norm"] - ref["grad_norm"]) / max(abs(ref["grad_norm"]), 1e-30),
            f"{ref['grad_norm']!r} vs {got['grad_norm']!r} (relative)",
        ),
    ]
    sums_ref, sums_got = ref["param_checksum"], got["param_checksum"]
    if sorted(sums_ref) != sorted(sums_got):
        raise AssertionError(
            f"the runs have different tensors: {sorted(sums_ref)} vs {sorted(sums_got)}"
        )
    for name, (s, q) in sums_ref.items():
        gs, gq = sums_got[name]
        norm = math.sqrt(q)
        if norm == 0.0:
            d_sum, d_sq = abs(gs), abs(gq)
        else:
            d_sum, d_sq = abs(gs - s) / norm, abs(gq - q) / q
        out.append((f"Σ {name}", d_sum, f"{s!r} vs {gs!r} (relative to ‖x‖ = {norm:.4g})"))
        out.append((f"Σ² {name}", d_sq, f"{q!r} vs {gq!r} (relative)"))
    return out


def assert_runs_agree(
    ref: list[dict[str, Any]], got: list[dict[str, Any]], tol: Tolerance
) -> dict[str, float]:
    """Asserts that every step of ``got`` is within ``tol`` of the same step of ``ref`` (the
    first step and quantity that differ are named); returns the largest difference of each
    kind (loss, grad_norm, params) for the caller to report."""
    assert len(got) == len(ref), f"{len(got)} steps, the reference has {len(ref)}"
    limits = {"loss": tol.loss, "grad_norm": tol.grad_norm}
    worst = {"loss": 0.0, "grad_norm": 0.0, "params": 0.0}
    for r, g in zip(ref, got):
        assert r["step"] == g["step"], (r["step"], g["step"])
        for what, diff, detail in _differences(r, g):
            kind = what if what in limits else "params"
            limit = limits.get(what, tol.params)
            if not diff <= limit:  # NaN fails too
                raise AssertionError(
                    f"step {r['step']}: {what} differs by {diff:.3g} > {limit:.3g} "
                    f"(tolerance {tol.name!r}): {detail}"
                )
            worst[kind] = max(worst[kind], diff)
    return worst
