"""ZeRO stage 3: parameters sharded at rest, gathered per unit (a block of the model) just
before its forward and again before its backward, freed right after each, the next unit's
gather prefetched while the current one computes (FSDP's forward and backward prefetch).

Units are the elements of the model's top-level :class:`moecore.nn.ModuleList` s (the
transformer blocks), plus the root (every other parameter: embeddings, final norm, the
tied head), which stays gathered from the start of forward to its end and from the start
of backward to its end. A unit holds only the parameters of its :class:`ZeRO`: under
expert parallelism two of them hook the same blocks (the replicated parameters gathered
over every rank, the experts over the ranks holding them); a block with none of a ZeRO's
parameters is no unit of it, and its root may be empty (it still marks where forward and
backward begin). The two hook each block's ``forward`` through
:func:`moecore.distributed.zero.forward_hooks.add_forward_hook`, removable in any order.

Each parameter's whole array lives in the unit's anonymous private mapping
(:mod:`moecore.distributed.zero.memory`), laid out in the order of the buckets' elements so
that each gather receives straight into it: freeing it is ``madvise(MADV_DONTNEED)``, which
returns the pages to the system while the arrays (which the autograd graph saved for
backward) keep their identity; the gather before backward writes the values back into
them. The truth between steps is this rank's part of every bucket
(:attr:`ShardedParams.shards`), which the optimizer updates.

The gathers go over their own communicator (a duplicate of the group): the gradients'
reduce-scatters are issued when buckets complete, which may differ between ranks (an
expert that got no token on one rank), and MPI requires one collective order per
communicator. The gathers themselves follow the modules' order, the same on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from moecore import nn
from moecore.autograd.grad_mode import is_grad_enabled
from moecore.autograd.tensor import Tensor
from moecore.distributed.group import Request
from moecore.distributed.zero.forward_hooks import add_forward_hook
from moecore.distributed.zero.memory import anonymous, release
from moecore.distributed.zero.shards import reduce_scatter_counts
from moecore.errors import UnusedParameters

if TYPE_CHECKING:
    from moecore.distributed.zero.wrapper import ZeRO

__all__ = ["ShardedParams", "UnusedParameters", "units"]


@dataclass
class _Unit:
    label: str
    module: Any
    params: list[int]
    #: (bucket, lo, hi, at): runs of the unit's consecutive elements in the buckets, each
    #: at ``flat[at : at + hi - lo]``.
    ranges: list[tuple[int, int, int, int]] = field(default_factory=list)
    memory: Any = None
    flat: Any = None
    gathered: bool = False
    pending: list[Request] = field(default_factory=list)
    ran: bool = False
    ready: set[int] = field(default_factory=set)


def units(model: Any, index: dict[int, int]) -> list[tuple[str, Any, list[int]]]:
    """(label, module, parameter indices) of each unit in forward order, the root first:
    ``model``'s blocks restricted to the parameters in ``index`` (those with none left
    out), the root with the rest of them — including the blocks that say
    ``gathered_with_root = True`` (a module whose parameters are used after its forward
    returned, which a unit's gathers would have freed by then)."""
    inside = {id(p) for p in model.parameters()}
    stray = [i for pid, i in index.items() if pid not in inside]
    if stray:
        raise ValueError(
            f"ZeRO stage 3: {len(stray)} parameters are not in the module whose blocks "
            "define the gather units"
        )
    found: list[tuple[str, Any, list[int]]] = []
    taken: set[int] = set()
    for name, child in model._modules.items():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                if getattr(block, "gathered_with_root", False):
                    continue  # used outside its own forward: its parameters join the root's
                params = [index[id(p)] for p in block.parameters() if id(p) in index]
                if params:
                    found.append((f"{name}.{i}", block, params))
                    taken.update(params)
    root = [i for i in sorted(index.values()) if i not in taken]
    return [("root", model, root), *found]


_EMPTY = np.zeros(0, dtype=np.float32)


class ShardedParams:
    """Stage 3's parameter handling for a :class:`ZeRO` (see the module docstring):
    ``model`` is the module whose blocks are the units and whose forward marks a step's
    start (it holds the ZeRO's parameters, possibly among others). Built after the
    parameters were broadcast."""

    def __init__(self, zero: ZeRO, model: Any) -> None:
        self.zero = zero
        self.comm = zero.group.split(0)
        index = {id(p): i for i, p in enumerate(zero.params)}
        #: This rank's part of every bucket's parameters: what persists between steps.
        self.shards = []
        for bi, b in enumerate(zero.buckets):
            lo, hi = zero.owned[bi]
            shard = np.zeros(hi - lo, dtype=np.float32)
            for g, off, n in b.slices:
                a, e = max(lo, off), min(hi, off + n)
                if a < e:
                    shard[a - lo : e - lo] = zero.params[g].data.reshape(-1)[a - off : e - off]
            self.shards.append(shard)
        for piece in zero.pieces:
            at = piece.lo - zero.owned[piece.bucket][0]
            piece.tensor = nn.Parameter(self.shards[piece.bucket][at : at + piece.numel])
        self.units: list[_Unit] = []
        self._unit_of: dict[int, int] = {}
        for u, (label, module, params) in enumerate(units(model, index)):
            unit = _Unit(label, module, params)
            for g in params:
                self._unit_of[g] = u
            self._place(unit)
            self.units.append(unit)
        self._hooks: list[Any] = []
        for u, unit in enumerate(self.units):
            self._wrap(u, unit.module)
        self._free_all()

    # --- layout ---------------------------------------------------------------------------

    def _place(self, unit: _Unit) -> None:
        """Moves the unit's parameters into one mapping, in the order of their elements in
        the buckets, and finds its bucket ranges: each range is then one slice of the
        mapping, which its gather receives into (no receive buffer, no copy after)."""
        order = sorted(unit.params, key=lambda g: self.zero._where[g])
        total = sum(self.zero.params[g].data.size for g in order)
        unit.memory, flat = anonymous(4 * total)
        at = 0
        # Runs of consecutive elements (the root's parameters come before and after the
        # blocks'): one gather each, into flat[at : at + hi - lo].
        runs: list[list[int]] = []
        for g in order:
            p = self.zero.params[g]
            bi, off, n = self.zero._where[g]
            view = flat[at : at + n].reshape(p.data.shape)
            view[...] = p.data
            p.data = view
            if runs and runs[-1][0] == bi and runs[-1][2] == off:
                runs[-1][2] = off + n
            else:
                runs.append([bi, off, off + n, at])
            at += n
        unit.flat = flat
        unit.ranges = [(bi, lo, hi, at) for bi, lo, hi, at in runs]

    def state_bytes(self) -> int:
        """Bytes of parameters this rank holds at rest (its parts)."""
        return sum(s.nbytes for s in self.shards)

    # --- gathering ------------------------------------------------------------------------

    def _launch(self, u: int) -> None:
        unit = self.units[u]
        if unit.gathered or unit.pending:
            return
        world = self.comm.size
        for bi, lo, hi, at in unit.ranges:
            numel = self.zero.buckets[bi].numel
            counts = reduce_scatter_counts(numel, lo, hi, world)
            own_lo, own_hi = self.zero.owned[bi]
            a, e = max(lo, own_lo), min(hi, own_hi)
            # This rank's piece of the range (the shards split each bucket, not the unit:
            # pieces differ in length, and an equal-slot all-gather would send padding).
            send = self.shards[bi][a - own_lo : e - own_lo] if a < e else _EMPTY
            # Received straight into the parameters (their pages come back as MPI writes).
            recv = unit.flat[at : at + hi - lo]
            req = self.comm.iallgather_counts(send, recv, counts)
            # The wrapper's driver progresses it with the gradients' operations (at the
            # hooks, or on the polling thread while this rank computes): MPI moves no
            # bytes otherwise, and a prefetch would only start when it is waited for.
            self.zero._driver.add(req)
            unit.pending.append(req)

    def _complete(self, u: int) -> None:
        unit = self.units[u]
        if unit.gathered:
            return
        self._launch(u)
        for req in unit.pending:
            with self.comm.watch(f"ZeRO stage 3: gather of {unit.label}", self.zero.timeout):
                self.zero._driver.wait(req)
        unit.pending = []
        unit.gathered = True

    def _free(self, u: int) -> None:
        unit = self.units[u]
        if unit.pending:  # a prefetch nobody used: complete it, MPI needs its buffers
            self._complete(u)
        if unit.gathered:
            release(unit.memory, unit.flat)
            unit.gathered = False

    def _free_all(self) -> None:
        for u in range(len(self.units)):
            self._free(u)

    @contextlib.contextmanager
    def gathered(self, writeback: bool = False) -> Iterator[None]:
        """Every parameter whole inside (checkpoints, checksums); with ``writeback`` the
        values found there on exit (e.g. a loaded checkpoint, the same on every rank)
        become this rank's parts."""
        for u in range(len(self.units)):
            self._launch(u)
        for u in range(len(self.units)):
            self._complete(u)
        try:
            yield
            if writeback:
                for bi, b in enumerate(self.zero.buckets):
                    lo, hi = self.zero.owned[bi]
                    for g, off, n in b.slices:
                        a, e = max(lo, off), min(hi, off + n)
                        if a < e:
                            src = self.zero.params[g].data.reshape(-1)[a - off : e - off]
                            self.shards[bi][a - lo : e - lo] = src
        finally:
            self._free_all()

    # --- forward and backward -------------------------------------------------------------

    def _wrap(self, u: int, module: Any) -> None:
        remove = add_forward_hook(
            module, lambda: self._before_forward(u), lambda out: self._after_forward(u, out)
        )
        self._hooks.append(remove)

    def _before_forward(self, u: int) -> None:
        if u == 0:
            for unit in self.units:
                unit.ran = False
                unit.ready = set()
        self._complete(u)
        self.units[u].ran = True
        if u + 1 < len(self.units):
            self._launch(u + 1)  # forward prefetch

    def _after_forward(self, u: int, out: Any) -> None:
        if u != 0:
            self._free(u)
        if isinstance(out, Tensor) and out.requires_grad and is_grad_enabled():
            out.register_hook(self._backward_hook(u))
        if u == 0:
            self._free(0)

    def _backward_hook(self, u: int) -> Callable[[Any], None]:
        """Runs when the gradient of unit ``u``'s output is complete: its backward is next."""

        def hook(_grad: Any) -> None:
            self._before_backward(u)

        return hook

    def _before_backward(self, u: int) -> None:
        if u == 0:
            self._check_all_ran()
            if len(self.units) > 1:
                self._launch(len(self.units) - 1)  # the last unit's backward comes next
        self._complete(u)
        if u > 1:
            self._launch(u - 1)  # backward prefetch (FSDP's BACKWARD_PRE)

    def _check_all_ran(self) -> None:
        idle = [unit for unit in self.units if not unit.ran]
        if idle:
            # Every rank refuses here alike: finish the gathers the forward prefetched (a
            # skipped block's) so that none is left in flight behind the error.
            for u in range(len(self.units)):
                if self.units[u].pending:
                    self._free(u)
            names = [self.zero.names[g] for unit in idle for g in unit.params]
            raise UnusedParameters(
                f"ZeRO stage 3: modules {[unit.label for unit in idle]} took no part in "
                f"forward, so their parameters {names[:6]}{' …' if len(names) > 6 else ''} "
                "were never gathered; stage 3 gathers each module as it runs. Remove them "
                "from the model or use zero=2"
            )

    def grad_ready(self, index: int) -> None:
        """A parameter's gradient is final: its unit is freed once all of them are."""
        u = self._unit_of[index]
        unit = self.units[u]
        unit.ready.add(index)
        if u != 0 and len(unit.ready) == len(unit.params):
            self._free(u)

    def end_of_backward(self) -> None:
        """Frees what backward left gathered (the root, units with unused gradients)."""
        self._free_all()

    def remove(self) -> None:
        """Leaves every parameter whole (as without stage 3) and puts the modules' own
        forward back."""
        for u in range(len(self.units)):
            self._launch(u)
        for u in range(len(self.units)):
            self._complete(u)
        for undo in self._hooks:
            undo()
        self._hooks.clear()
