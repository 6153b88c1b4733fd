"""``MPIGroup``: a process group over MPI through mpi4py's buffer API.

Only the upper-case (buffer) methods are used — ``Allreduce``, ``Iallreduce``, ``Allgather``,
``Iallgatherv``, ``Alltoallv``, ``Bcast`` — on contiguous numpy arrays, so no pickling and no
copy happens on the way in. Small buffers that every call needs (counts, displacements) are
allocated once per group. mpi4py is imported when a group is built, never by
``import moecore``. Every blocking call runs under the group's watchdog (``timeout``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moecore.distributed import in_flight
from moecore.distributed.group import (
    DEFAULT_TIMEOUT,
    Group,
    Request,
    check_allgather_counts,
    check_buffer,
    check_reduce_scatter,
)
from moecore.distributed.launch import drain_output
from moecore.distributed.watchdog import Watchdog, check_timeout

__all__ = ["MPIGroup", "import_mpi"]

_INT_MAX = (1 << 31) - 1


def import_mpi() -> Any:
    """``mpi4py.MPI``, or an ``ImportError`` saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "moecore.distributed over MPI needs mpi4py and an MPI library: "
            "pip install 'moecore[mpi]' (mpi4py + mpich)"
        ) from exc
    return MPI


def _byte_counts(counts: np.ndarray, row_bytes: int, what: str) -> np.ndarray:
    b = counts.astype(np.int64) * row_bytes
    if b.size and int(b.sum()) > _INT_MAX:
        raise ValueError(
            f"{what}: {int(b.sum())} bytes in one call exceed MPI's 2 GiB count limit; "
            "split the buffer"
        )
    return b.astype(np.int32)


def _displacements(counts: np.ndarray) -> np.ndarray:
    d = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=d[1:])
    return d


class _MPIRequest(Request):
    """An MPI request; ``keep``: the buffers, held alive while MPI may still touch them."""

    def __init__(
        self,
        group: MPIGroup,
        what: str,
        req: Any,
        keep: tuple[Any, ...],
        on_done: Callable[[], None] | None,
    ) -> None:
        super().__init__(on_done)
        self._group, self._what = group, what
        self._req = req
        # Held outside the request too: a request dropped (or left behind by an error)
        # before it completed must not free what MPI may still write (in_flight.py).
        in_flight.hold(self, (req, *keep))

    def test(self) -> bool:
        if not self._done and self._req.Test():
            in_flight.release(self)
            self._complete()
        return self._done

    def wait(self) -> None:
        if not self._done:
            with self._group.watch(f"waiting for {self._what}"):
                self._req.Wait()
            in_flight.release(self)
            self._complete()


_BF16_SUM: Any = None


def _bf16_sum(mpi: Any) -> Any:
    """MPI has no bfloat16 type: a user-defined sum over 2-byte elements that widens both
    operands to float32, adds and rounds back (to nearest even), as NCCL's bf16 all-reduce
    does at each hop. Created once per process."""
    global _BF16_SUM
    if _BF16_SUM is None:
        import ml_dtypes

        bf16 = np.dtype(ml_dtypes.bfloat16)

        def add(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
            a = np.frombuffer(inbuf, dtype=bf16)
            b = np.frombuffer(inoutbuf, dtype=bf16)
            np.add(a, b, out=b, dtype=np.float32, casting="unsafe")

        _BF16_SUM = mpi.Op.Create(add, commute=True)
    return _BF16_SUM


def _describe(buf: np.ndarray) -> str:
    return f"{buf.size} {buf.dtype}"


def _split_parts(recv: np.ndarray, byte_counts: np.ndarray, dtype: np.dtype) -> list[np.ndarray]:
    displs = _displacements(byte_counts)
    return [recv[int(o) : int(o) + int(c)].view(dtype) for o, c in zip(displs, byte_counts)]


class MPIGroup(Group):
    """A group over an MPI communicator (``MPI.COMM_WORLD`` by default).

    Args:
        comm: an ``mpi4py.MPI.Comm``; None for ``COMM_WORLD``.
        timeout: seconds any blocking call may last before the job is ended (None: for
            ever); see :class:`moecore.distributed.Group`.
    """

    def __init__(self, comm: Any = None, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.timeout = check_timeout(timeout)
        self.mpi = import_mpi()
        self.comm = self.mpi.COMM_WORLD if comm is None else comm
        self.rank = int(self.comm.Get_rank())
        self.size = int(self.comm.Get_size())
        self._ops = {"sum": self.mpi.SUM, "max": self.mpi.MAX, "min": self.mpi.MIN}
        # Preallocated per group: the count exchange of alltoallv.
        self._send_counts = np.zeros(self.size, dtype=np.int64)
        self._recv_counts = np.zeros(self.size, dtype=np.int64)

    def _reduction(self, buf: Any, op: str) -> tuple[Any, Any]:
        """The MPI buffer and operation reducing ``buf`` (bfloat16: 2-byte elements summed
        by :func:`_bf16_sum`)."""
        check_buffer(buf, "buf", writable=True)
        op = self._check_op(op)
        if buf.dtype.name != "bfloat16":
            return buf, self._ops[op]
        if op != "sum":
            raise ValueError(f"a bfloat16 buffer is reduced by 'sum' only, got {op!r}")
        return [buf.view(np.uint16), self.mpi.UINT16_T], _bf16_sum(self.mpi)

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        target, mpi_op = self._reduction(buf, op)
        with self.watch(f"allreduce of {_describe(buf)}"):
            self.comm.Allreduce(self.mpi.IN_PLACE, target, op=mpi_op)
        return buf

    def iallreduce(
        self, buf: Any, op: str = "sum", on_done: Callable[[], None] | None = None
    ) -> Request:
        target, mpi_op = self._reduction(buf, op)
        req = self.comm.Iallreduce(self.mpi.IN_PLACE, target, op=mpi_op)
        return _MPIRequest(self, f"an all-reduce of {_describe(buf)}", req, (buf,), on_done)

    def allgather(self, send: Any, recv: Any) -> Any:
        check_buffer(send, "send")
        check_buffer(recv, "recv", writable=True)
        if recv.shape != (self.size, *send.shape) or recv.dtype != send.dtype:
            raise ValueError(
                f"recv must have shape {(self.size, *send.shape)} and dtype {send.dtype}, "
                f"got {recv.shape} {recv.dtype}"
            )
        with self.watch(f"allgather of {_describe(send)}"):
            self.comm.Allgather(send, recv)
        return recv

    def iallgather(
        self, send: Any, recv: Any, on_done: Callable[[], None] | None = None
    ) -> Request:
        check_buffer(send, "send")
        check_buffer(recv, "recv", writable=True)
        if recv.shape != (self.size, *send.shape) or recv.dtype != send.dtype:
            raise ValueError(
                f"recv must have shape {(self.size, *send.shape)} and dtype {send.dtype}, "
                f"got {recv.shape} {recv.dtype}"
            )
        req = self.comm.Iallgather(send, recv)
        return _MPIRequest(self, f"an all-gather of {_describe(send)}", req, (send, recv), on_done)

    def ireduce_scatter(
        self,
        send: Any,
        recv: Any,
        counts: Sequence[int],
        on_done: Callable[[], None] | None = None,
    ) -> Request:
        check_reduce_scatter(send, recv, counts, self.rank, self.size)
        req = self.comm.Ireduce_scatter(
            send, recv, recvcounts=[int(c) for c in counts], op=self.mpi.SUM
        )
        what = f"a reduce-scatter of {_describe(send)}"
        return _MPIRequest(self, what, req, (send, recv), on_done)

    def iallgather_counts(
        self,
        send: Any,
        recv: Any,
        counts: Sequence[int],
        on_done: Callable[[], None] | None = None,
    ) -> Request:
        check_allgather_counts(send, recv, counts, self.rank, self.size)
        byte_counts = _byte_counts(np.asarray(counts, dtype=np.int64), send.itemsize, "allgather")
        MPI = self.mpi
        req = self.comm.Iallgatherv(
            [send.reshape(-1).view(np.uint8), MPI.BYTE],
            [recv.view(np.uint8), (byte_counts, _displacements(byte_counts)), MPI.BYTE],
        )
        what = f"an all-gather of {recv.size} {recv.dtype} in pieces {list(counts)}"
        return _MPIRequest(self, what, req, (send, recv), on_done)

    def iallgatherv(self, send: Any, on_done: Callable[[list[Any]], None] | None = None) -> Request:
        check_buffer(send, "send")
        if send.ndim != 1:
            raise ValueError(f"send must be 1-D, got shape {send.shape}")
        # The lengths are exchanged blocking: a second non-blocking phase started later
        # could interleave differently with other collectives on different ranks, and MPI
        # requires the same collective order everywhere.
        mine = np.array([send.nbytes], dtype=np.int64)
        counts = np.empty(self.size, dtype=np.int64)
        with self.watch("allgatherv's exchange of lengths"):
            self.comm.Allgather(mine, counts)
        byte_counts = _byte_counts(counts, 1, "allgatherv")
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        MPI = self.mpi
        req = self.comm.Iallgatherv(
            [send.reshape(-1).view(np.uint8), MPI.BYTE],
            [recv, (byte_counts, _displacements(byte_counts)), MPI.BYTE],
        )
        done = None
        if on_done is not None:
            done = lambda: on_done(_split_parts(recv, byte_counts, send.dtype))  # noqa: E731
        what = f"an all-gather-v of {int(counts.sum())} bytes"
        return _MPIRequest(self, what, req, (send, recv), done)

    def alltoall(self, send: Any, recv: Any) -> Any:
        check_buffer(send, "send")
        check_buffer(recv, "recv", writable=True)
        if send.shape[:1] != (self.size,) or recv.shape != send.shape or recv.dtype != send.dtype:
            raise ValueError(
                f"send and recv must both have shape ({self.size}, ...) and one dtype, "
                f"got {send.shape} {send.dtype} and {recv.shape} {recv.dtype}"
            )
        with self.watch(f"alltoall of {_describe(send)}"):
            self.comm.Alltoall(send, recv)
        return recv

    def alltoallv(self, send: Any, send_counts: Sequence[int]) -> tuple[Any, np.ndarray]:
        check_buffer(send, "send")
        counts = np.asarray(send_counts, dtype=np.int64)
        if counts.shape != (self.size,) or (counts < 0).any() or int(counts.sum()) != send.shape[0]:
            raise ValueError(
                f"send_counts must be {self.size} non-negative row counts summing to "
                f"{send.shape[0]}, got {list(send_counts)}"
            )
        self._send_counts[:] = counts
        with self.watch("alltoallv's exchange of counts"):
            self.comm.Alltoall(self._send_counts, self._recv_counts)
        recv_counts = self._recv_counts.copy()
        row_bytes = int(np.prod(send.shape[1:], dtype=np.int64)) * send.itemsize
        recv = np.empty((int(recv_counts.sum()), *send.shape[1:]), dtype=send.dtype)
        sb = _byte_counts(counts, row_bytes, "alltoallv")
        rb = _byte_counts(recv_counts, row_bytes, "alltoallv")
        byte = self.mpi.BYTE
        with self.watch(f"alltoallv of {_describe(send)}"):
            self.comm.Alltoallv(
                [send.reshape(-1).view(np.uint8), (sb, _displacements(sb)), byte],
                [recv.reshape(-1).view(np.uint8), (rb, _displacements(rb)), byte],
            )
        return recv, recv_counts

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        check_buffer(buf, "buf", writable=True)
        if not 0 <= root < self.size:
            raise ValueError(f"root must be in [0, {self.size}), got {root}")
        with self.watch(f"broadcast of {_describe(buf)} from rank {root}"):
            self.comm.Bcast(buf, root=root)
        return buf

    def isend(self, buf: Any, dest: int, tag: int, what: str = "a send") -> Request:
        check_buffer(buf, "buf")
        req = self.comm.Isend(buf, dest=int(dest), tag=int(tag))
        return _MPIRequest(self, what, req, (buf,), None)

    def irecv(self, buf: Any, source: int, tag: int, what: str = "a receive") -> Request:
        check_buffer(buf, "buf", writable=True)
        req = self.comm.Irecv(buf, source=int(source), tag=int(tag))
        return _MPIRequest(self, what, req, (buf,), None)

    def barrier(self) -> None:
        with self.watch("barrier"):
            self.comm.Barrier()

    def split(self, color: int, key: int | None = None) -> MPIGroup:
        with self.watch("split"):
            comm = self.comm.Split(int(color), self.rank if key is None else int(key))
        return self._sub(comm)

    def dup(self) -> MPIGroup:
        """The same ranks on a new communicator (its collectives never match this group's)."""
        with self.watch("dup"):
            return self._sub(self.comm.Dup())

    def _sub(self, comm: Any) -> MPIGroup:
        """A group over ``comm``, a part of this one: same timeout, same watchdog."""
        if self._watchdog is None:
            self._watchdog = Watchdog(self._timed_out)
        sub = MPIGroup(comm, self.timeout)
        sub._watchdog = self._watchdog
        return sub

    def abort(self, code: int = 1) -> None:
        drain_output()
        self.mpi.COMM_WORLD.Abort(code)
