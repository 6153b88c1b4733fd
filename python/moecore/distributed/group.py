"""The process-group interface every backend implements, and :class:`SingleProcess`.

A group moves bytes between the ranks of a job; it never decides what to send (that is
:mod:`moecore.comm`'s job). Every operation works on numpy arrays (CuPy arrays for
:class:`~moecore.distributed.nccl.NCCLGroup`) that are C-contiguous, and writes into buffers the
caller preallocated wherever the size is known in advance.
"""

from __future__ import annotations

import contextlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moecore.distributed.watchdog import Watchdog, check_timeout

__all__ = [
    "DEFAULT_TIMEOUT",
    "Group",
    "Request",
    "SingleProcess",
    "check_buffer",
    "check_reduce_scatter",
]

#: Seconds a blocking operation of a group may last before the job is ended: 30 minutes,
#: PyTorch's default for ``init_process_group``.
DEFAULT_TIMEOUT = 1800.0
_GROUP_LIMIT = (
    "the group's timeout: moecore.distributed.init(timeout=...), comm_timeout_s in a run's config"
)


def check_buffer(buf: Any, what: str, *, writable: bool = False) -> np.ndarray:
    """``buf`` as a C-contiguous numpy array, or a clear ``TypeError``/``ValueError``."""
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (shape {buf.shape}, strides {buf.strides})")
    if writable and not buf.flags.writeable:
        raise ValueError(f"{what} is read-only")
    return buf


class Request:
    """A non-blocking operation in flight. MPI only moves the bytes while someone calls into
    it, so call :meth:`test` now and then (between backward steps) and :meth:`wait` when the
    result is needed. ``on_done`` runs once, in the thread that saw completion."""

    def __init__(self, on_done: Callable[[], None] | None = None) -> None:
        self._done = False
        self._on_done = on_done

    def _complete(self) -> None:
        if not self._done:
            self._done = True
            if self._on_done is not None:
                self._on_done()

    @property
    def done(self) -> bool:
        """Whether the operation completed (and its ``on_done`` ran)."""
        return self._done

    def test(self) -> bool:
        """Drives the operation; True once it completed."""
        self._complete()
        return True

    def wait(self) -> None:
        """Blocks until the operation completed."""
        self._complete()


class Group(ABC):
    """A set of ranks that communicate. ``rank`` is this process's index in ``[0, size)``.

    ``timeout`` (seconds, None for ever) bounds every blocking operation: past it, the
    group's watchdog prints which operation on which rank did not complete and ends the job
    (:meth:`abort`), as PyTorch's process groups do; a rank that hangs would otherwise hold
    every other rank forever. Sub-groups from :meth:`split` inherit it."""

    rank: int
    size: int
    timeout: float | None = None
    _watchdog: Watchdog | None = None

    @property
    def is_root(self) -> bool:
        """True on rank 0 (the rank that writes files)."""
        return self.rank == 0

    @abstractmethod
    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        """In place: every rank's ``buf`` becomes the element-wise ``op`` (``"sum"``,
        ``"max"``, ``"min"``) over ranks. Returns ``buf``."""

    @abstractmethod
    def iallreduce(
        self, buf: Any, op: str = "sum", on_done: Callable[[], None] | None = None
    ) -> Request:
        """Non-blocking :meth:`allreduce`; ``buf`` must not be touched until the request is
        done. ``on_done`` runs once at completion (e.g. to scale the sum into a mean)."""

    @abstractmethod
    def allgather(self, send: Any, recv: Any) -> Any:
        """``recv[r] = send of rank r``; ``recv`` has shape ``(size, *send.shape)``."""

    @abstractmethod
    def iallgather(
        self, send: Any, recv: Any, on_done: Callable[[], None] | None = None
    ) -> Request:
        """Non-blocking :meth:`allgather` (``recv`` shape ``(size, *send.shape)``)."""

    @abstractmethod
    def iallgatherv(self, send: Any, on_done: Callable[[list[Any]], None] | None = None) -> Request:
        """All-gather of 1-D arrays whose lengths differ by rank: the lengths are exchanged
        at once (blocking), the data without blocking. ``on_done(parts)`` receives one array
        per rank."""

    def allgatherv(self, send: Any) -> list[Any]:
        """Every rank's 1-D ``send`` (lengths may differ), in rank order."""
        out: list[Any] = []
        self.iallgatherv(send, on_done=out.extend).wait()
        return out

    def ireduce_scatter(
        self,
        send: Any,
        recv: Any,
        counts: Sequence[int],
        on_done: Callable[[], None] | None = None,
    ) -> Request:
        """Non-blocking reduce-scatter (sum): ``send`` (1-D, ``sum(counts)`` elements) is
        cut into consecutive pieces of ``counts[r]`` elements; rank ``r``'s ``recv``
        (``counts[r]`` elements) becomes the sum over ranks of piece ``r``. This default
        all-reduces a copy; backends override it with the real collective."""
        lo, hi = check_reduce_scatter(send, recv, counts, self.rank, self.size)
        summed = send.copy()
        return self.iallreduce(summed, on_done=_copy_then(summed[lo:hi], recv, on_done))

    def iallgather_counts(
        self,
        send: Any,
        recv: Any,
        counts: Sequence[int],
        on_done: Callable[[], None] | None = None,
    ) -> Request:
        """Non-blocking all-gather of pieces whose lengths every rank already knows (the
        inverse of :meth:`ireduce_scatter`): rank ``r``'s ``send`` (``counts[r]`` elements)
        lands at ``recv[sum(counts[:r]) : sum(counts[:r + 1])]`` on every rank; ``recv`` is
        1-D with ``sum(counts)`` elements. No lengths are exchanged and no padding is sent
        (an uneven split costs only its bytes). This default all-gathers padded copies;
        backends override it with the real collective."""
        check_allgather_counts(send, recv, counts, self.rank, self.size)
        slot = max(int(c) for c in counts)
        padded = np.zeros(slot, dtype=send.dtype)
        padded[: send.size] = send
        parts = np.empty((self.size, slot), dtype=send.dtype)

        def unpack() -> None:
            at = 0
            for r, c in enumerate(int(c) for c in counts):
                recv[at : at + c] = parts[r, :c]
                at += c
            if on_done is not None:
                on_done()

        return self.iallgather(padded, parts, on_done=unpack)

    @abstractmethod
    def alltoall(self, send: Any, recv: Any) -> Any:
        """``recv[r] = send[this rank] of rank r``; both have shape ``(size, ...)``."""

    @abstractmethod
    def alltoallv(self, send: Any, send_counts: Sequence[int]) -> tuple[Any, np.ndarray]:
        """Sends ``send[offsets[r]:offsets[r]+send_counts[r]]`` (along axis 0) to rank ``r``;
        counts are exchanged first. Returns the received rows, concatenated in rank order,
        and how many came from each rank."""

    @abstractmethod
    def broadcast(self, buf: Any, root: int = 0) -> Any:
        """In place: every rank's ``buf`` becomes ``root``'s. Returns ``buf``."""

    @abstractmethod
    def barrier(self) -> None:
        """Returns once every rank called it."""

    @abstractmethod
    def split(self, color: int, key: int | None = None) -> Group:
        """The sub-group of the ranks that passed the same ``color``, ordered by ``key``
        (default: this rank). Every rank of this group must call it."""

    def isend(self, buf: Any, dest: int, tag: int, what: str = "a send") -> Request:
        """Non-blocking point-to-point send of ``buf`` to rank ``dest`` with ``tag``; ``buf``
        must not change until the request is done. ``what`` names it to the watchdog."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point messages")

    def irecv(self, buf: Any, source: int, tag: int, what: str = "a receive") -> Request:
        """Non-blocking receive into ``buf`` from rank ``source`` with ``tag``; waiting on
        it is bounded by the group's timeout, naming ``what``."""
        raise NotImplementedError(f"{type(self).__name__} has no point-to-point messages")

    def abort(self, code: int = 1) -> None:  # noqa: B027 - a no-op default is intended
        """Ends every rank of the job (used when one rank failed); a single process just
        returns and lets the exception propagate."""

    def watch(
        self, what: str, timeout: float | None = None, limit: str | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Bounds a blocking wait: if the body lasts over ``timeout`` seconds (default: the
        group's), the job ends with a message naming ``what`` and ``limit`` (where the limit
        is set). Nothing happens in a group of one, which never waits for anyone."""
        seconds = self.timeout if timeout is None else check_timeout(timeout)
        if seconds is None or self.size == 1:
            return contextlib.nullcontext()
        if self._watchdog is None:
            self._watchdog = Watchdog(self._timed_out)
        where = f"{what} on rank {self.rank} of {self.size}"
        return self._watchdog.watch(seconds, where, limit or _GROUP_LIMIT)

    def _timed_out(self, message: str) -> None:
        """The watchdog's verdict (on its thread): say why, then end every rank."""
        print(f"moecore: {message}", file=sys.stderr, flush=True)
        self.abort(1)

    def _check_op(self, op: str) -> str:
        if op not in ("sum", "max", "min"):
            raise ValueError(f"op must be 'sum', 'max' or 'min', got {op!r}")
        return op

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def check_reduce_scatter(
    send: np.ndarray, recv: np.ndarray, counts: Sequence[int], rank: int, size: int
) -> tuple[int, int]:
    """Checks a reduce-scatter's arguments; returns this rank's piece of ``send``."""
    check_buffer(send, "send")
    check_buffer(recv, "recv", writable=True)
    return _check_split(("send", send), ("recv", recv), counts, rank, size)


def check_allgather_counts(
    send: np.ndarray, recv: np.ndarray, counts: Sequence[int], rank: int, size: int
) -> None:
    """Checks :meth:`Group.iallgather_counts`'s arguments."""
    check_buffer(send, "send")
    check_buffer(recv, "recv", writable=True)
    _check_split(("recv", recv), ("send", send), counts, rank, size)


def _check_split(
    whole: tuple[str, np.ndarray],
    piece: tuple[str, np.ndarray],
    counts: Sequence[int],
    rank: int,
    size: int,
) -> tuple[int, int]:
    """A 1-D array of ``sum(counts)`` elements cut into per-rank pieces, and this rank's
    piece (``counts[rank]`` elements, the same dtype); returns where that piece lies."""
    (wname, w), (pname, p) = whole, piece
    if len(counts) != size or any(int(c) < 0 for c in counts):
        raise ValueError(f"counts must be {size} non-negative numbers, got {list(counts)}")
    if w.ndim != 1 or w.size != sum(int(c) for c in counts):
        raise ValueError(f"{wname} must be 1-D with sum(counts) elements, got shape {w.shape}")
    if p.shape != (int(counts[rank]),) or p.dtype != w.dtype:
        raise ValueError(
            f"{pname} must have shape ({int(counts[rank])},) and dtype {w.dtype}, "
            f"got {p.shape} {p.dtype}"
        )
    lo = sum(int(c) for c in counts[:rank])
    return lo, lo + int(counts[rank])


def _copy_then(
    src: np.ndarray, dst: np.ndarray, on_done: Callable[[], None] | None
) -> Callable[[], None]:
    def done() -> None:
        dst[...] = src
        if on_done is not None:
            on_done()

    return done


class SingleProcess(Group):
    """The group of one process: every collective is the identity (copies where a result
    buffer is separate). What :func:`moecore.distributed.init` returns without an MPI launcher."""

    def __init__(self) -> None:
        self.rank = 0
        self.size = 1

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        self._check_op(op)
        check_buffer(buf, "buf", writable=True)
        return buf

    def iallreduce(
        self, buf: Any, op: str = "sum", on_done: Callable[[], None] | None = None
    ) -> Request:
        self.allreduce(buf, op)
        req = Request(on_done)
        req.wait()
        return req

    def allgather(self, send: Any, recv: Any) -> Any:
        check_buffer(send, "send")
        check_buffer(recv, "recv", writable=True)
        if recv.shape != (1, *send.shape):
            raise ValueError(f"recv must have shape {(1, *send.shape)}, got {recv.shape}")
        recv[0] = send
        return recv

    def iallgather(
        self, send: Any, recv: Any, on_done: Callable[[], None] | None = None
    ) -> Request:
        self.allgather(send, recv)
        req = Request(on_done)
        req.wait()
        return req

    def iallgatherv(self, send: Any, on_done: Callable[[list[Any]], None] | None = None) -> Request:
        check_buffer(send, "send")
        parts = [send.copy()]
        req = Request(None if on_done is None else lambda: on_done(parts))
        req.wait()
        return req

    def alltoall(self, send: Any, recv: Any) -> Any:
        return self.allgather(send[0], recv)

    def alltoallv(self, send: Any, send_counts: Sequence[int]) -> tuple[Any, np.ndarray]:
        check_buffer(send, "send")
        counts = np.asarray(send_counts, dtype=np.int64)
        if counts.shape != (1,) or int(counts[0]) != send.shape[0]:
            raise ValueError(f"send_counts must be [{send.shape[0]}], got {list(send_counts)}")
        return send.copy(), counts

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        if root != 0:
            raise ValueError(f"root must be 0 in a group of 1, got {root}")
        return check_buffer(buf, "buf", writable=True)

    def barrier(self) -> None:
        return None

    def split(self, color: int, key: int | None = None) -> Group:
        return SingleProcess()
