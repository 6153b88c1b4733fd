"""``ZeRO``: :class:`DataParallel` with the optimizer state (stage 1) and the gradients
(stage 2) sharded over the group."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from moecore import nn
from moecore.comm import Action
from moecore.distributed.data_parallel import DataParallel
from moecore.distributed.group import Group, Request
from moecore.distributed.zero.shards import Piece, owned_range, reduce_scatter_counts
from moecore.distributed.zero.stage3 import ShardedParams, units

__all__ = ["STAGES", "ZeRO"]

#: The stages :class:`ZeRO` implements.
STAGES = (1, 2, 3)


class ZeRO(DataParallel):
    """Data parallelism whose ranks each own 1/P of every gradient bucket.

    Args:
        model: an :class:`moecore.nn.Module` (or anything with ``named_parameters``).
        group: the data-parallel group.
        stage: 1 — gradients all-reduced as by :class:`DataParallel`, optimizer state kept
            for the owned elements only; 2 — gradients also reduce-scattered during backward
            (bucket by bucket, on the same scheduler), so each rank keeps only its part;
            3 — parameters too, gathered per module as it runs
            (:mod:`moecore.distributed.zero.stage3`).
        module: stage 3 only: the :class:`moecore.nn.Module` whose blocks are gathered
            one by one (their parameters in ``model``) and whose forward starts a step;
            default ``model`` itself, which must then be an ``nn.Module``. Given when
            ``model`` is a subset of a module's parameters (expert parallelism: one ZeRO
            of the replicated parameters, one of the experts, both over the same model).
        **kwargs: as for :class:`DataParallel`; compression only with stage 1 (stage 2 sends
            no all-reduce to compress).

    The buckets are those of the first step (DDP's one-time rebuild is left out: the shards
    are cut from the buckets). Wrap the optimizer with
    :class:`moecore.distributed.zero.ShardedOptimizer`, which updates the owned pieces
    (:attr:`pieces`) and then calls :meth:`gather_params`.

    Use::

        zero = ZeRO(model, group, stage=2)
        opt = ShardedOptimizer(AdamW(model.parameters()), [zero])
        loss.backward(); zero.finish(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self, model: Any, group: Group, stage: int = 1, *, module: Any = None, **kwargs: Any
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"ZeRO: stage must be one of {list(STAGES)}, got {stage!r}")
        if stage >= 2 and kwargs.get("compress") not in (None, "", "none"):
            raise ValueError(
                "ZeRO: compression composes with stage 1 only (stage 2 reduce-scatters the "
                "gradients, there is no all-reduce left to compress)"
            )
        if stage >= 2 and kwargs.get("wire_dtype", "float32") != "float32":
            raise ValueError(
                f"ZeRO: wire_dtype {kwargs['wire_dtype']!r} is for all-reduced buckets (stage "
                "1); stages 2 and 3 reduce-scatter the gradients in float32"
            )
        if module is not None and stage != 3:
            raise ValueError("ZeRO: module= is for stage 3 (the blocks it gathers one by one)")
        if stage == 3:
            module = model if module is None else module
            if not isinstance(module, nn.Module):
                raise TypeError(
                    "ZeRO stage 3 needs an nn.Module (it gathers per module): pass the model, "
                    "or module= the model a parameter subset belongs to"
                )
        self.stage = self._zero_stage = stage
        self.sharded: ShardedParams | None = None
        self._unit_module = module
        # Stage 3 gathers a unit at a time from its buckets' owned parts: buckets within
        # one unit make those parts even (no rank sends a whole unit alone).
        self._split_layers = stage == 3
        super().__init__(model, group, **kwargs)
        if stage == 3:
            self.sharded = ShardedParams(self, module)

    def _grad_layers(self, named: list[tuple[str, Any]]) -> list[int]:
        """Stage 3: each gradient's gather unit (the root 0, then the blocks)."""
        if self._unit_module is None:
            return super()._grad_layers(named)
        layer = [0] * len(named)
        index = {id(p): i for i, (_, p) in enumerate(named)}
        for u, (_, _, params) in enumerate(units(self._unit_module, index)):
            for i in params:
                layer[i] = u
        return layer

    # --- layout -------------------------------------------------------------------------

    def _layout(self) -> None:
        self.buckets = self.scheduler.buckets()
        rank, world = self.group.rank, self.group.size
        # Stage 1 all-reduces into full buckets; stage 2 keeps only its part of each.
        self.buffers = (
            [np.zeros(b.numel, dtype=np.float32) for b in self.buckets] if self.stage == 1 else []
        )
        self._where = {}
        self.owned = [owned_range(b.numel, rank, world) for b in self.buckets]
        self.grad_shards = (
            [np.zeros(hi - lo, dtype=np.float32) for lo, hi in self.owned]
            if self.stage >= 2
            else []
        )
        #: This rank's pieces of the parameters, in bucket order.
        self.pieces: list[Piece] = []
        for bi, b in enumerate(self.buckets):
            lo, hi = self.owned[bi]
            for g, off, n in b.slices:
                self._where[g] = (bi, off, n)
                a, e = max(lo, off), min(hi, off + n)
                if a < e:
                    self.pieces.append(Piece.of(self.params[g], g, bi, a, a - off, e - a))

    def remove_hooks(self) -> None:
        """As :meth:`DataParallel.remove_hooks`; stage 3 leaves every parameter whole."""
        if self.sharded is not None:
            self.sharded.remove()
        super().remove_hooks()

    def _ready(self, index: int) -> None:
        super()._ready(index)
        if self.sharded is not None:
            self.sharded.grad_ready(index)

    @contextlib.contextmanager
    def gathered(self, writeback: bool = False) -> Iterator[None]:
        """Every parameter whole inside (stage 3 holds only parts at rest; other stages
        always hold them whole); ``writeback``: values put there become this rank's parts."""
        if self.sharded is None or self.group.size == 1:
            yield
            return
        with self.sharded.gathered(writeback):
            yield

    def _rebuild(self) -> None:
        """Kept out: the shards (and the optimizer state over them) follow the buckets."""

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the parameters (whole) and the gradients (whole with
        stage 1, its part with stage 2)."""
        params = (
            sum(p.data.nbytes for p in self.params)
            if self.sharded is None
            else self.sharded.state_bytes()
        )
        grads = sum(b.nbytes for b in self.buffers) + sum(s.nbytes for s in self.grad_shards)
        return {"param_bytes": params, "grad_bytes": grads}

    # --- gradients ----------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Stage 1: as :meth:`DataParallel.no_sync`. Stage 2: the backward inside still
        reduce-scatters and the parts accumulate (each rank holds only its part of the sum
        of the micro-batches' gradients, never a whole one across backward passes)."""
        if self.stage == 1:
            with super().no_sync():
                yield
            return
        yield
        if self.group.size > 1:
            self._flush()

    def _launch(self, a: Action) -> Request:
        if self.stage == 1:
            return super()._launch(a)
        lo, hi = a.offset, a.offset + a.numel
        send = np.empty(a.numel, dtype=np.float32)
        self._fill(a.bucket, lo, hi, out=send)
        numel = self.buckets[a.bucket].numel
        counts = reduce_scatter_counts(numel, lo, hi, self.group.size)
        recv = np.empty(counts[self.group.rank], dtype=np.float32)
        own_lo = self.owned[a.bucket][0]
        start = max(lo, own_lo) - own_lo
        target = self.grad_shards[a.bucket][start : start + recv.size]
        inv = np.float32(1.0 / self.group.size)

        def accumulate() -> None:
            np.multiply(recv, inv, out=recv)
            np.add(target, recv, out=target)

        req = self.group.ireduce_scatter(send, recv, counts, on_done=accumulate)
        # The whole gradients this launch sent are no longer needed: freed now, not at
        # the end of backward (what stage 2 saves).
        for g, off, n in self.buckets[a.bucket].slices:
            if lo <= off and off + n <= hi:
                self.params[g].grad = None
        return req

    def _flush(self) -> None:
        """Stage 2: sends what this backward left, waits, and drops the whole gradients."""
        self._send_rest()
        for p in self.params:
            p.grad = None
        if self.sharded is not None:
            self.sharded.end_of_backward()

    def finish(self) -> dict[str, Any]:
        """Completes the gradients' communication and points each owned piece's ``.grad``
        at its averaged gradient (stage 1: in the all-reduced buckets; stage 2: in this
        rank's parts). Returns the step's statistics (:meth:`DataParallel.finish`)."""
        if self.stage == 1 or self.group.size == 1:
            stats = super().finish()
            if self.sharded is not None:
                self.sharded.end_of_backward()
            for piece in self.pieces:
                grad = self.params[piece.index].grad
                piece.tensor.grad = (
                    None
                    if grad is None
                    else grad.reshape(-1)[piece.start : piece.start + piece.numel]
                )
            return stats
        t0 = time.perf_counter()
        self._flush()
        for piece in self.pieces:
            own_lo = self.owned[piece.bucket][0]
            at = piece.lo - own_lo
            piece.tensor.grad = self.grad_shards[piece.bucket][at : at + piece.numel]
        self._stats["finish_seconds"] = time.perf_counter() - t0
        self.last_stats, self._stats = self._stats, self._new_stats()
        return self.last_stats

    def zero_grad(self) -> None:
        """Clears the gradients: the pieces', the parameters' and (stage 2) the parts."""
        for piece in self.pieces:
            piece.tensor.grad = None
        for p in self.params:
            p.grad = None
        for shard in self.grad_shards:
            shard.fill(0.0)

    def grad_square_sum(self) -> float:
        """Sum of squares of the owned gradient elements (float64): summed over the group,
        the squared norm of the whole averaged gradient."""
        total = 0.0
        for piece in self.pieces:
            g = piece.tensor.grad
            if g is not None:
                g64 = g.astype(np.float64)
                total += float(g64 @ g64)
        return total

    def scale_grads(self, factor: float) -> None:
        """Multiplies the owned gradient elements by ``factor`` (clipping, expert scaling)."""
        f = np.float32(factor)
        for piece in self.pieces:
            if piece.tensor.grad is not None:
                piece.tensor.grad *= f

    # --- parameters and state -----------------------------------------------------------

    def allgather_pieces(self, read: Callable[[Piece], np.ndarray | None]) -> list[np.ndarray]:
        """Every bucket's whole flat array of what ``read(piece)`` gives for each owned
        piece (zeros where it gives None): one non-blocking all-gather per bucket."""
        world = self.group.size
        recvs, requests = [], []
        for bi, b in enumerate(self.buckets):
            lo = self.owned[bi][0]
            chunk = -(-b.numel // world)
            send = np.zeros(chunk, dtype=np.float32)
            for piece in self.pieces:
                if piece.bucket == bi:
                    value = read(piece)
                    if value is not None:
                        send[piece.lo - lo : piece.lo - lo + piece.numel] = value.reshape(-1)
            recv = np.empty((world, chunk), dtype=np.float32)
            req = self.group.iallgather(send, recv)
            self._driver.add(req)
            recvs.append(recv)
            requests.append(req)
        out = []
        for bi, (recv, req) in enumerate(zip(recvs, requests)):
            with self.group.watch(f"ZeRO: all-gather of bucket {bi}", self.timeout):
                self._driver.wait(req)
            out.append(recv.reshape(-1)[: self.buckets[bi].numel])
        self._driver.clear()
        return out

    def gather_params(self) -> None:
        """All-gathers the parameters after this rank updated its pieces."""
        if self.group.size == 1 or self.sharded is not None:
            return  # stage 3 gathers each module when it runs
        for bi, full in enumerate(self.allgather_pieces(lambda p: p.tensor.data)):
            for g, off, n in self.buckets[bi].slices:
                self.params[g].data.reshape(-1)[...] = full[off : off + n]

    def gather_state(
        self, state_of: Callable[[Piece], dict[str, Any]]
    ) -> dict[int, dict[str, Any]]:
        """The whole optimizer state of every parameter (by index) from the pieces' states
        (``state_of(piece)``): arrays all-gathered, scalars (equal in every piece, e.g. a
        step count) taken from whichever rank has them. A collective."""
        kinds: dict[str, str] = {}
        for piece in self.pieces:
            for key, value in state_of(piece).items():
                kinds[key] = "array" if isinstance(value, np.ndarray) else type(value).__name__
        merged: dict[str, str] = {}
        for part in self.group.allgatherv(np.frombuffer(json.dumps(kinds).encode(), np.uint8)):
            merged.update(json.loads(bytes(part).decode()))
        out: dict[int, dict[str, Any]] = {}
        n = len(self.params)
        for key, kind in sorted(merged.items()):
            if kind == "array":
                fulls = self.allgather_pieces(_entry(state_of, key))
                for g, (bi, off, size) in self._where.items():
                    shape = self.params[g].data.shape
                    out.setdefault(g, {})[key] = fulls[bi][off : off + size].reshape(shape).copy()
                continue
            values = np.full(n, -np.inf)
            for piece in self.pieces:
                if key in state_of(piece):
                    values[piece.index] = float(state_of(piece)[key])
            self.group.allreduce(values, op="max")
            cast: Callable[[float], Any] = int if kind == "int" else float
            for g in range(n):
                if np.isfinite(values[g]):
                    out.setdefault(g, {})[key] = cast(values[g])
        return out


def _entry(
    state_of: Callable[[Piece], dict[str, Any]], key: str
) -> Callable[[Piece], np.ndarray | None]:
    """Reads entry ``key`` of a piece's state (None where it has none)."""
    return lambda piece: state_of(piece).get(key)
