"""Preemption: SIGTERM (what SLURM, Kubernetes and most schedulers send before killing a job)
and SIGUSR1 (SLURM's ``--signal`` warning) let the current step finish, then the trainer
writes a checkpoint and the command exits with :data:`PREEMPTED_EXIT`.

Ctrl-C (SIGINT) takes the same path and exits 0: a KeyboardInterrupt raised wherever the
step happened to be (between two parameters' optimizer updates, or after the step but before
its metrics line) would have saved a step half-applied or without its metrics. A second
Ctrl-C raises KeyboardInterrupt at once, for a step that will not finish; nothing is saved
then, and the last checkpoint stays the latest. A SIGINT the process inherited as ignored
(``nohup``, a background job) stays ignored, as Python itself does.

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
        self.signum = 0  # the SIGTERM/SIGUSR1 this rank received (0: none)
        self.interrupted = False  # Ctrl-C on this rank
        self.ranks_asked = 0  # ranks that had received SIGTERM/SIGUSR1, from the all-reduce
        self.ranks_interrupted = 0  # ranks that had received Ctrl-C, from the all-reduce
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Starts catching the signals (main thread only: Python's rule for handlers)."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.interrupted:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.interrupted = True

    def flags(self) -> list[float]:
        """This rank's votes for the step's all-reduce: (preempt, interrupt), 1.0 for yes."""
        return [1.0 if self.signum else 0.0, 1.0 if self.interrupted else 0.0]

    def agree(self, summed: Any) -> None:
        """Records the all-reduced votes of a step (the sums of :meth:`flags`)."""
        self.ranks_asked, self.ranks_interrupted = int(summed[0]), int(summed[1])

    def should_stop(self, world_size: int) -> bool:
        """True when the run must stop after the step just done: this process was signalled
        (single process), or some rank was by the time of the step's all-reduce (so every
        rank decides the same at the same step)."""
        if world_size == 1:
            return bool(self.signum) or self.interrupted
        return self.ranks_asked > 0 or self.ranks_interrupted > 0

    def preempted(self, world_size: int) -> bool:
        """Whether the stop is a preemption (exit :data:`PREEMPTED_EXIT`) rather than Ctrl-C
        (exit 0): a SIGTERM/SIGUSR1 on any rank wins."""
        return bool(self.signum) if world_size == 1 else self.ranks_asked > 0

    def describe(self, world_size: int) -> str:
        """What stopped the run, for the log."""
        if world_size == 1:
            return signal.Signals(self.signum).name
        return f"SIGTERM/SIGUSR1 on {self.ranks_asked} of {world_size} ranks"
