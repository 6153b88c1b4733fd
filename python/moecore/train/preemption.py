"""Preemption: SIGTERM (what SLURM, Kubernetes and most schedulers send before killing a job)
and SIGUSR1 (SLURM's ``--signal`` warning) let the current step finish, then the trainer
writes a checkpoint and the command exits with :data:`PREEMPTED_EXIT`.

Under ``mpiexec`` the signal may reach one rank only. Each rank's "asked to stop" flag rides
in the per-step all-reduce the trainer already does (loss and dropped tokens), so every rank
learns it at the same step and stops after that step — no extra collective, nothing added to
a step but one float."""

from __future__ import annotations

import signal
import threading
from typing import Any

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint: sysexits'
#: EX_TEMPFAIL ("temporary failure; the user is invited to retry"), so a job script can
#: requeue on it (``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``). Distinct from 143
#: (128 + SIGTERM), which still means "killed by SIGTERM without a checkpoint".
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Catches SIGTERM/SIGUSR1 while installed and says when every rank should stop."""

    def __init__(self) -> None:
        self.signum = 0  # the signal this rank received (0: none)
        self.ranks_asked = 0  # ranks that had received one, from the last all-reduce
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Starts catching the signals (main thread only: Python's rule for handlers)."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def flag(self) -> float:
        """This rank's vote for the step's all-reduce: 1.0 when asked to stop."""
        return 1.0 if self.signum else 0.0

    def agree(self, summed: float) -> None:
        """Records the all-reduced votes of a step."""
        self.ranks_asked = int(summed)

    def should_stop(self, world_size: int) -> bool:
        """True when the run must stop after the step just done: this process was signalled
        (single process), or some rank was by the time of the step's all-reduce (so every
        rank decides the same at the same step)."""
        return bool(self.signum) if world_size == 1 else self.ranks_asked > 0

    def describe(self, world_size: int) -> str:
        """What stopped the run, for the log."""
        if world_size == 1:
            return signal.Signals(self.signum).name
        return f"SIGTERM/SIGUSR1 on {self.ranks_asked} of {world_size} ranks"
