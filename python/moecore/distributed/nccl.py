"""``NCCLGroup``: all-reduce, all-gather and broadcast of CuPy arrays through CuPy's NCCL.

Not run on these machines (no GPU; ``tests/test_dist_nccl.py`` skips with the reason): kept
deliberately small. MPI only bootstraps it (rank 0 makes the NCCL unique id and broadcasts
it); every operation then runs on the current CUDA stream. Operations NCCL lacks here
(all-to-all-v, sub-groups) raise ``NotImplementedError``. Waits for the stream run under the
bootstrap group's watchdog (its ``timeout``), and :meth:`NCCLGroup.abort` ends the job
through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moecore.distributed.group import Group, Request

__all__ = ["NCCLGroup"]


class _StreamRequest(Request):
    """Done when a CUDA event recorded after the operation has been reached."""

    def __init__(
        self, group: NCCLGroup, what: str, event: Any, on_done: Callable[[], None] | None
    ) -> None:
        super().__init__(on_done)
        self._group, self._what = group, what
        self._event = event

    def test(self) -> bool:
        if not self._done and self._event.done:
            self._complete()
        return self._done

    def wait(self) -> None:
        if not self._done:
            with self._group.watch(f"waiting for {self._what}"):
                self._event.synchronize()
            self._complete()


class NCCLGroup(Group):
    """One GPU per rank; ``bootstrap`` (an :class:`~moecore.distributed.mpi.MPIGroup`) hands out
    the NCCL id and gives rank and size."""

    def __init__(self, bootstrap: Group) -> None:
        import cupy
        from cupy.cuda import nccl

        self._cupy = cupy
        self._nccl = nccl
        self._bootstrap = bootstrap
        self.rank, self.size = bootstrap.rank, bootstrap.size
        uid = np.zeros(nccl.get_unique_id().__len__(), dtype=np.int64)
        if bootstrap.rank == 0:
            uid[:] = nccl.get_unique_id()
        bootstrap.broadcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, tuple(int(x) for x in uid), self.rank)
        self._types = {
            np.dtype(np.float32): nccl.NCCL_FLOAT32,
            np.dtype(np.float16): nccl.NCCL_FLOAT16,
            np.dtype(np.int64): nccl.NCCL_INT64,
            np.dtype(np.uint8): nccl.NCCL_UINT8,
        }
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}

    def _type(self, buf: Any) -> int:
        try:
            return self._types[np.dtype(buf.dtype)]
        except KeyError:
            raise TypeError(f"NCCLGroup cannot move dtype {buf.dtype}") from None

    def _stream(self) -> Any:
        return self._cupy.cuda.get_current_stream()

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        self.iallreduce(buf, op).wait()
        return buf

    def iallreduce(
        self, buf: Any, op: str = "sum", on_done: Callable[[], None] | None = None
    ) -> Request:
        stream = self._stream()
        ptr = buf.data.ptr
        self.comm.allReduce(
            ptr, ptr, buf.size, self._type(buf), self._ops[self._check_op(op)], stream.ptr
        )
        return _StreamRequest(
            self, f"an all-reduce of {buf.size} {buf.dtype}", stream.record(), on_done
        )

    def allgather(self, send: Any, recv: Any) -> Any:
        stream = self._stream()
        self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._type(send), stream.ptr)
        with self.watch(f"allgather of {send.size} {send.dtype}"):
            stream.synchronize()
        return recv

    def iallgather(
        self, send: Any, recv: Any, on_done: Callable[[], None] | None = None
    ) -> Request:
        stream = self._stream()
        self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._type(send), stream.ptr)
        what = f"an all-gather of {send.size} {send.dtype}"
        return _StreamRequest(self, what, stream.record(), on_done)

    def iallgatherv(self, send: Any, on_done: Callable[[list[Any]], None] | None = None) -> Request:
        # Lengths first, then an all-gather padded to the longest.
        n = self._cupy.asarray([send.size], dtype=np.int64)
        counts = self._cupy.empty(self.size, dtype=np.int64)
        self.allgather(n, counts)
        sizes = [int(c) for c in counts.get()]
        padded = self._cupy.zeros(max(sizes), dtype=send.dtype)
        padded[: send.size] = send
        recv = self._cupy.empty((self.size, max(sizes)), dtype=send.dtype)
        self.allgather(padded, recv)
        parts = [recv[r, : sizes[r]] for r in range(self.size)]
        req = Request(None if on_done is None else lambda: on_done(parts))
        req.wait()
        return req

    def alltoall(self, send: Any, recv: Any) -> Any:
        raise NotImplementedError("NCCLGroup.alltoall is not implemented yet")

    def alltoallv(self, send: Any, send_counts: Sequence[int]) -> tuple[Any, np.ndarray]:
        raise NotImplementedError("NCCLGroup.alltoallv is not implemented yet")

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        stream = self._stream()
        self.comm.bcast(buf.data.ptr, buf.size, self._type(buf), root, stream.ptr)
        with self.watch(f"broadcast of {buf.size} {buf.dtype} from rank {root}"):
            stream.synchronize()
        return buf

    def barrier(self) -> None:
        self.allreduce(self._cupy.zeros(1, dtype=np.float32))

    def split(self, color: int, key: int | None = None) -> Group:
        raise NotImplementedError("NCCLGroup sub-groups are not implemented yet")

    @property
    def timeout(self) -> float | None:  # type: ignore[override]
        """The bootstrap group's: its watchdog bounds the stream waits."""
        return self._bootstrap.timeout

    def abort(self, code: int = 1) -> None:
        """Ends every rank through the bootstrap group (``MPI_Abort``)."""
        self._bootstrap.abort(code)

    def watch(
        self, what: str, timeout: float | None = None, limit: str | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return self._bootstrap.watch(f"NCCL {what}", timeout, limit)
