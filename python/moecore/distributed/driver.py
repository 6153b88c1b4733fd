"""Driving non-blocking collectives: MPI moves their bytes only while someone calls into it.

``"hooks"`` tests every request in flight at each gradient hook (no thread; progress only
happens between layers). ``"thread"`` adds a background thread that tests them every
``interval`` seconds while any is in flight (needs ``MPI_THREAD_MULTIPLE``, which mpi4py
asks for by default); requests are only ever tested or waited for under one lock, as MPI
forbids completing the same request from two threads at once.
"""

from __future__ import annotations

import threading
import time

from moecore.distributed.group import Request

__all__ = ["Driver"]

MODES = ("hooks", "thread")


class Driver:
    """Keeps the requests in flight and lets them progress (see the module docstring)."""

    def __init__(self, mode: str = "hooks", interval: float = 0.0005) -> None:
        if mode not in MODES:
            raise ValueError(f"progress must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: list[Request] = []
        self._work = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def add(self, req: Request) -> None:
        """Tracks ``req`` until it completed."""
        with self._lock:
            self._pending.append(req)
        if self.mode == "thread":
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="moecore-mpi", daemon=True)
                self._thread.start()
            self._work.set()

    def poll(self) -> None:
        """Tests every request in flight once (what the hooks call)."""
        with self._lock:
            self._pending = [r for r in self._pending if not r.test()]

    def wait(self, req: Request) -> None:
        """Blocks until ``req`` completed."""
        with self._lock:
            req.wait()

    def clear(self) -> None:
        """Forgets every request (all were waited for)."""
        with self._lock:
            self._pending.clear()
            self._work.clear()

    def close(self) -> None:
        """Stops the thread, if any."""
        self._stop = True
        self._work.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop:
            self._work.wait()
            with self._lock:
                self._pending = [r for r in self._pending if not r.test()]
                if not self._pending:
                    self._work.clear()
            time.sleep(self.interval)
