"""Finding out whether this process was started by an MPI launcher, and the group to use."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

from moecore.dist.group import Group, SingleProcess

__all__ = ["abort_job", "init", "launched_by_mpi", "mpi_family", "world_size_from_env"]

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


def init(backend: str = "auto") -> Group:
    """The world group of this job.

    Args:
        backend: ``"auto"`` (MPI under an MPI launcher, else a single process),
            ``"mpi"``, ``"nccl"`` (GPU; bootstrapped over MPI) or ``"single"``.

    Without a launcher, ``"auto"`` returns :class:`SingleProcess` and never imports mpi4py.
    """
    if backend not in ("auto", "mpi", "nccl", "single"):
        raise ValueError(f"backend must be 'auto', 'mpi', 'nccl' or 'single', got {backend!r}")
    if backend == "single" or (backend == "auto" and not launched_by_mpi()):
        return SingleProcess()
    from moecore.dist.mpi import MPIGroup

    world = MPIGroup()
    if backend == "nccl":
        from moecore.dist.nccl import NCCLGroup

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
    sys.stdout.flush()
    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code)


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
