"""Hierarchical all-reduce for ranks spread over nodes (Horovod's scheme), opt-in.

With ``ranks_per_node`` ranks per node (consecutive world ranks share a node): reduce-scatter
inside the node, all-reduce each shard across nodes (between the ranks with the same local
rank), all-gather inside the node. Inter-node traffic per rank drops to ``1/ranks_per_node``
of a flat all-reduce's.

Non-blocking, each all-reduce is a chain of three collectives on three communicators
(node, cross-node, and a duplicate of the node one for the last phase). MPI requires the
same collective order on every rank of a communicator, so a chain enters a phase only after
every chain launched before it has entered that phase: each communicator then sees the
operations in launch order on every rank, whatever the timing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moecore.distributed.group import Group, Request, check_buffer
from moecore.distributed.mpi import MPIGroup

__all__ = ["HierarchicalGroup"]


class _Chain(Request):
    def __init__(self, group: HierarchicalGroup, buf: np.ndarray, op: str, on_done: Any) -> None:
        super().__init__(on_done)
        self.group, self.buf, self.op = group, buf, op
        n, local = buf.size, group.local.size
        self.counts = np.full(local, n // local, dtype=np.int64)
        self.counts[: n % local] += 1
        self.displs = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.shard = np.empty(int(self.counts[group.local.rank]), dtype=buf.dtype)
        self.phase = 0
        self.req: Any = None
        self._start_phase()

    def _start_phase(self) -> None:
        g, mpi = self.group, self.group.world.mpi
        flat = self.buf.reshape(-1)
        op = g.world._ops[self.op]
        if self.phase == 0:
            self.req = g.local.comm.Ireduce_scatter(flat, self.shard, list(self.counts), op=op)
        elif self.phase == 1:
            self.req = g.cross.comm.Iallreduce(mpi.IN_PLACE, self.shard, op=op)
        else:
            self.req = g.gather.comm.Iallgatherv(self.shard, [flat, (self.counts, self.displs)])

    def advance(self, earlier_phase: int) -> None:
        """Moves on while the current collective is done and the chain launched before this
        one (now in ``earlier_phase``; 3 = finished) is already further."""
        while self.phase < 3 and self.req.Test():
            if self.phase == 2:
                self.phase = 3
                self._complete()
                return
            if earlier_phase <= self.phase:
                return
            self.phase += 1
            self._start_phase()

    def test(self) -> bool:
        self.group._progress()
        return self._done

    def wait(self) -> None:
        while not self._done:
            if self.group._chains and self.group._chains[0] is self and self.phase < 3:
                # The oldest chain blocks instead of spinning.
                with self.group.watch(
                    f"waiting for phase {self.phase} of a hierarchical all-reduce"
                ):
                    self.req.Wait()
            self.group._progress()


class HierarchicalGroup(Group):
    """``world`` (an :class:`MPIGroup`) seen as ``size / ranks_per_node`` nodes. All-reduce
    is hierarchical; every other operation is ``world``'s."""

    def __init__(self, world: MPIGroup, ranks_per_node: int) -> None:
        if ranks_per_node < 1 or world.size % ranks_per_node:
            raise ValueError(
                f"ranks_per_node ({ranks_per_node}) must divide the world size ({world.size})"
            )
        self.world = world
        self.rank, self.size = world.rank, world.size
        self.ranks_per_node = ranks_per_node
        node, local_rank = divmod(world.rank, ranks_per_node)
        self.local = world.split(node, key=local_rank)
        self.cross = world.split(local_rank, key=node)
        self.gather = self.local.dup()
        self._chains: list[_Chain] = []

    def _progress(self) -> None:
        earlier = 3
        for chain in self._chains:
            chain.advance(earlier)
            earlier = chain.phase
        self._chains = [c for c in self._chains if not c.done]

    def allreduce(self, buf: Any, op: str = "sum") -> Any:
        self.iallreduce(buf, op).wait()
        return buf

    def iallreduce(
        self, buf: Any, op: str = "sum", on_done: Callable[[], None] | None = None
    ) -> Request:
        check_buffer(buf, "buf", writable=True)
        chain = _Chain(self, buf, self._check_op(op), on_done)
        self._chains.append(chain)
        return chain

    def allgather(self, send: Any, recv: Any) -> Any:
        return self.world.allgather(send, recv)

    def iallgather(
        self, send: Any, recv: Any, on_done: Callable[[], None] | None = None
    ) -> Request:
        return self.world.iallgather(send, recv, on_done)

    def iallgatherv(self, send: Any, on_done: Callable[[list[Any]], None] | None = None) -> Request:
        return self.world.iallgatherv(send, on_done)

    def iallgather_counts(
        self,
        send: Any,
        recv: Any,
        counts: Sequence[int],
        on_done: Callable[[], None] | None = None,
    ) -> Request:
        return self.world.iallgather_counts(send, recv, counts, on_done)

    def alltoall(self, send: Any, recv: Any) -> Any:
        return self.world.alltoall(send, recv)

    def alltoallv(self, send: Any, send_counts: Sequence[int]) -> tuple[Any, np.ndarray]:
        return self.world.alltoallv(send, send_counts)

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        return self.world.broadcast(buf, root)

    def barrier(self) -> None:
        self.world.barrier()

    def split(self, color: int, key: int | None = None) -> Group:
        return self.world.split(color, key)

    def abort(self, code: int = 1) -> None:
        self.world.abort(code)

    @property
    def timeout(self) -> float | None:  # type: ignore[override]
        """The world's: its watchdog bounds this group's waits."""
        return self.world.timeout

    def watch(
        self, what: str, timeout: float | None = None, limit: str | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return self.world.watch(what, timeout, limit)
