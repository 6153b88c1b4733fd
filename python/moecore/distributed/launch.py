"""Finding out whether this process was started by an MPI launcher, and the group to use."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Mapping

from moecore.distributed.group import DEFAULT_TIMEOUT, Group, SingleProcess
from moecore.distributed.watchdog import check_timeout

__all__ = [
    "abort_job",
    "drain_output",
    "init",
    "launched_by_mpi",
    "mpi_family",
    "world_size_from_env",
]

#: Variables the launchers set in each rank's environment, size first: MPICH/Hydra and other
#: PMI launchers (Slurm's srun included), PMIx, Open MPI, MVAPICH.
_SIZE_VARS = ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def world_size_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """The world size an MPI launcher announced in ``env`` (default ``os.environ``), or None
    when no launcher is visible."""
    env = os.environ if env is None else env
    for var in _SIZE_VARS:
        value = env.get(var)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{var}={value!r} is not an integer") from None
    return None


def launched_by_mpi(env: Mapping[str, str] | None = None) -> bool:
    """True when an MPI launcher (``mpiexec``, ``srun``) started this process."""
    env = os.environ if env is None else env
    return world_size_from_env(env) is not None or any(v in env for v in _RANK_VARS)


def init(backend: str = "auto", timeout: float | None = DEFAULT_TIMEOUT) -> Group:
    """The world group of this job.

    Args:
        backend: ``"auto"`` (MPI under an MPI launcher, else a single process),
            ``"mpi"``, ``"nccl"`` (GPU; bootstrapped over MPI) or ``"single"``.
        timeout: seconds any blocking operation of the MPI group (and of its sub-groups) may
            last before its watchdog prints which one did not complete and ends the job;
            None waits for ever. 30 minutes by default, as PyTorch's process groups.

    Without a launcher, ``"auto"`` returns :class:`SingleProcess` and never imports mpi4py.
    """
    if backend not in ("auto", "mpi", "nccl", "single"):
        raise ValueError(f"backend must be 'auto', 'mpi', 'nccl' or 'single', got {backend!r}")
    timeout = check_timeout(timeout)
    if backend == "single" or (backend == "auto" and not launched_by_mpi()):
        return SingleProcess()
    from moecore.distributed.mpi import MPIGroup

    world = MPIGroup(timeout=timeout)
    if backend == "nccl":
        from moecore.distributed.nccl import NCCLGroup

        return NCCLGroup(world)
    return world


def abort_job(code: int) -> None:
    """Ends every rank of this MPI job (``MPI_Abort`` on the world) when an MPI launcher
    started this process among others; does nothing otherwise (or without mpi4py).

    For a rank that stops with an error before or outside any collective: the other ranks
    may be waiting for it in one, and a plain exit would wait for them in ``MPI_Finalize``.
    """
    if (world_size_from_env() or 1) <= 1:
        return
    try:
        from mpi4py import MPI
    except ImportError:
        return
    drain_output()
    MPI.COMM_WORLD.Abort(code)


def drain_output(limit: float = 2.0) -> None:
    """Flushes stdout and stderr and lets the launcher read them (up to ``limit`` seconds)
    before an ``MPI_Abort``: the launcher kills every rank at once on an abort, and a reason
    still in the pipe to it is lost (seen in about 1 of 12 timed-out jobs under MPICH)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and any(_unread(fd) for fd in (1, 2)):
        time.sleep(0.01)
    # Read is not yet passed on: the launcher's process next to the rank forwards it.
    time.sleep(0.1)


def _unread(fd: int) -> int:
    """Bytes written to ``fd`` that its reader has not read yet (0 unless it is a pipe)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def mpi_family(mpiexec: str) -> str | None:
    """``"Open MPI"`` or ``"MPICH"``: the MPI that the launcher ``mpiexec`` belongs to, from
    its ``--version`` (None when it cannot be run or told). The two need different flags:
    Open MPI's launcher refuses more ranks than cores, and root, unless told."""
    try:
        text = subprocess.run(
            [mpiexec, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "Open MPI" in text or "OpenRTE" in text:
        return "Open MPI"
    if "HYDRA" in text or "MPICH" in text:
        return "MPICH"
    return None
