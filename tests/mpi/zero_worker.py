"""Run under ``mpiexec -n P python -m mpi4py zero_worker.py MODE CORPUS OUT``; raises (and so
aborts every rank) when a check fails. Rank 0 prints ``OK <mode>`` at the end.

Modes:
- ``nonfinite``: ``--zero 2`` on P ranks, rank 1's embedding NaN (after the broadcast of
  the initial parameters): the global norm is NaN on every rank, so every rank skips the
  same steps and stops with ``TrainingDiverged`` after ``max_bad_steps``.
- ``reduce_scatter``: the group's reduce-scatter with uneven counts against numpy.
- ``stage3``: a small model of three blocks under ``ZeRO(stage=3)`` against plain
  :class:`DataParallel`: the same parameters after 3 AdamW steps; during each block's
  forward the next block's gather is in flight (prefetch) and the blocks before it are
  freed; after forward and between steps every parameter is freed (reads zero); a fourth
  block that forward skips raises the same error on every rank.
- ``stage3_two``: the same model under two stage-3 ZeROs hooking the same blocks, as with
  expert parallelism (``module=`` the model; the blocks' biases in one, everything else in
  the other, each over its own communicator): the parameters of plain
  :class:`DataParallel` after 3 steps; a block that forward skips raises
  ``UnusedParameters`` on every rank, also when only the second ZeRO holds parameters of
  it.
"""

from __future__ import annotations

import io
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np

import moecore as mc
import moecore.distributed as dist
from moecore import nn, optim
from moecore.distributed.zero import ShardedOptimizer, ZeRO
from moecore.errors import UnusedParameters
from moecore.train import Trainer, TrainingDiverged, build_config


def nonfinite(corpus: str, out: Path) -> None:
    group = dist.init()
    values = {"data": corpus, "steps": 6, "eval_every": 0, "checkpoint_every": 0}
    values.update(seq_len=32, batch_size=8, max_bad_steps=3, dp=group.size, zero=2)
    trainer = Trainer(
        build_config("moe-tiny", overrides=values), out, out=io.StringIO(), group=group
    )
    if group.rank == 1:
        trainer.model.tok_emb.weight.data[:] = np.nan
    before = {k: v.copy() for k, v in trainer.model.state_dict().items()}
    try:
        trainer.train()
    except TrainingDiverged as exc:
        assert "3 consecutive steps" in str(exc), exc
    else:
        raise AssertionError(f"rank {group.rank}: the run did not stop")
    # Skipped steps leave every parameter as it was, on every rank (no rank updated its
    # part, no all-gather spread a NaN).
    for name, value in trainer.model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    group.barrier()
    if group.rank == 0:
        records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["skipped"] for r in records] == [True, True, True], records


def reduce_scatter(corpus: str, out: Path) -> None:
    """``Group.ireduce_scatter`` with uneven counts (one rank getting none) against numpy's
    sum of every rank's array, which each rank rebuilds from the ranks' seeds; and
    ``Group.iallgather_counts``, its inverse, against numpy's concatenation."""
    group = dist.init()
    counts = [3 * r + (r == 1) for r in range(group.size)]  # rank 0 receives nothing
    total = sum(counts)

    def send_of(rank: int) -> np.ndarray:
        return np.random.default_rng(7 + rank).standard_normal(total).astype(np.float32)

    lo = sum(counts[: group.rank])
    expected = sum(send_of(r).astype(np.float64) for r in range(group.size))[
        lo : lo + counts[group.rank]
    ]
    recv = np.full(counts[group.rank], np.nan, dtype=np.float32)
    done = []
    group.ireduce_scatter(send_of(group.rank), recv, counts, on_done=lambda: done.append(1)).wait()
    assert done == [1]
    np.testing.assert_allclose(recv, expected, rtol=1e-6, atol=1e-6)
    try:
        group.ireduce_scatter(send_of(group.rank), recv, counts[:-1])
    except ValueError as exc:
        assert "counts must be" in str(exc), exc
    else:
        raise AssertionError("wrong counts accepted")
    # Its inverse, as stage 3 gathers: every rank's piece (rank 0's empty) in rank order,
    # against numpy's concatenation of the pieces each rank rebuilds; also through the
    # base class's padded default, which other backends use.
    pieces = [send_of(r)[: counts[r]] for r in range(group.size)]
    for gather in (group.iallgather_counts, partial(dist.Group.iallgather_counts, group)):
        whole = np.full(total, np.nan, dtype=np.float32)
        done.clear()
        gather(pieces[group.rank], whole, counts, on_done=lambda: done.append(1)).wait()
        assert done == [1]
        np.testing.assert_array_equal(whole, np.concatenate(pieces))
    try:
        group.iallgather_counts(pieces[group.rank], np.empty(total + 1, np.float32), counts)
    except ValueError as exc:
        assert "sum(counts)" in str(exc), exc
    else:
        raise AssertionError("a receive buffer of the wrong length accepted")


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        object.__setattr__(self, "probe", None)

    def forward(self, x):
        if self.probe is not None:  # what the test looks at while the block computes
            self.probe()
        return self.lin(x).tanh() + x


class _Net(nn.Module):
    def __init__(self, blocks: int, used: int) -> None:
        super().__init__()
        mc.manual_seed(3)
        self.emb = nn.Linear(5, 8)
        self.blocks = nn.ModuleList([_Block(8) for _ in range(blocks)])
        self.head = nn.Linear(8, 1)
        self.used = used

    def forward(self, x):
        h = self.emb(x)
        for block in list(self.blocks)[: self.used]:
            h = block(h)
        return (self.head(h) * self.head(h)).mean()


def _plain(group, seed):
    """Three batches (this rank's rows: ``mine``) and ``_Net(3, 3)`` after 3 AdamW steps
    on them under plain :class:`DataParallel`."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((4 * group.size, 5)).astype(np.float32) for _ in range(3)]
    mine = slice(4 * group.rank, 4 * group.rank + 4)
    ref = _Net(3, 3)
    dp = dist.DataParallel(ref, group)
    ref_opt = optim.AdamW(ref.parameters(), lr=1e-2)
    for x in batches:
        ref(mc.Tensor(x[mine])).backward()
        dp.finish()
        ref_opt.step()
        ref_opt.zero_grad()
    dp.remove_hooks()
    return batches, mine, ref


def _expect_unused(loss, block, name):
    try:
        loss.backward()
    except UnusedParameters as exc:
        assert f"modules ['{block}'] took no part in forward" in str(exc), exc
        assert name in str(exc), exc
    else:
        raise AssertionError("a block that forward skipped was not refused")


def _assert_equal_params(ref, net):
    for (name, a), b in zip(ref.named_parameters(), net.parameters()):
        np.testing.assert_allclose(b.data, a.data, rtol=1e-6, atol=1e-7, err_msg=name)


def stage3(corpus: str, out: Path) -> None:
    group = dist.init()
    batches, mine, ref = _plain(group, 11)
    net = _Net(3, 3)
    zero = ZeRO(net, group, stage=3)
    units = zero.sharded.units
    assert [u.label for u in units] == ["root", "blocks.0", "blocks.1", "blocks.2"]
    seen = []

    def probe(i):
        def look():
            seen.append(
                (
                    i,
                    units[i + 1].gathered,
                    i + 2 >= len(units) or bool(units[i + 2].pending),  # prefetch
                    [u.gathered for u in units[1 : i + 1]],  # earlier blocks freed
                )
            )

        return look

    for i, block in enumerate(net.blocks):
        object.__setattr__(block, "probe", probe(i))
    opt = ShardedOptimizer(optim.AdamW(net.parameters(), lr=1e-2), [zero])
    for x in batches:
        loss = net(mc.Tensor(x[mine]))
        for p in net.blocks[1].parameters():  # freed after its forward
            assert not p.data.any(), "a block's parameters were not freed after forward"
        loss.backward()
        zero.finish()
        opt.step()
        opt.zero_grad()
        assert not any(u.gathered for u in units)
    assert len(seen) == 9, seen
    for i, gathered, prefetched, earlier in seen:
        assert gathered, f"block {i} ran without its parameters"
        assert prefetched, f"block {i + 1}'s gather was not in flight during block {i}"
        assert not any(earlier[:-1]), f"blocks before {i} still gathered: {earlier}"
    with zero.gathered():
        _assert_equal_params(ref, net)
    for p in net.parameters():
        assert not p.data.any(), "parameters not freed after gathered()"
    unused = _Net(4, 3)
    zero = ZeRO(unused, group, stage=3)
    _expect_unused(unused(mc.Tensor(batches[0][mine])), "blocks.3", "blocks.3.lin.weight")


class _Subset:
    def __init__(self, named):
        self._named = named

    def named_parameters(self):
        return list(self._named)


def _two_zeros(net, group, inner, skip=()):
    """Two stage-3 ZeROs over ``net``: parameters named in ``inner`` over a duplicate of
    ``group``, the others but ``skip`` over ``group``."""
    named = list(net.named_parameters())
    outer = [(n, p) for n, p in named if n not in inner and n not in skip]
    first = ZeRO(_Subset(outer), group, stage=3, module=net)
    second = ZeRO(
        _Subset([(n, p) for n, p in named if n in inner]), group.split(0), stage=3, module=net
    )
    return [first, second]


def stage3_two(corpus: str, out: Path) -> None:
    group = dist.init()
    batches, mine, ref = _plain(group, 12)
    net = _Net(3, 3)
    biases = {f"blocks.{i}.lin.bias" for i in range(3)}
    zeros = _two_zeros(net, group, biases)
    assert [u.label for u in zeros[1].sharded.units] == ["root", "blocks.0", "blocks.1", "blocks.2"]
    assert zeros[1].sharded.units[0].params == []
    opt = ShardedOptimizer(optim.AdamW(net.parameters(), lr=1e-2), zeros)
    for x in batches:
        net(mc.Tensor(x[mine])).backward()
        for zero in zeros:
            zero.finish()
        opt.step()
        opt.zero_grad()
        assert not any(p.data.any() for p in net.parameters()), "not freed between steps"
    with zeros[0].gathered(), zeros[1].gathered():
        _assert_equal_params(ref, net)
    # A block forward skips, in both ZeROs: the first one's check names it.
    unused = _Net(4, 3)
    _two_zeros(unused, group, {f"blocks.{i}.lin.bias" for i in range(4)})
    _expect_unused(unused(mc.Tensor(batches[0][mine])), "blocks.3", "blocks.3.lin.weight")
    # ... in the second only (the first holds nothing of it): the second one's check.
    unused = _Net(4, 3)
    _two_zeros(unused, group, {"blocks.3.lin.bias"}, skip={"blocks.3.lin.weight"})
    _expect_unused(unused(mc.Tensor(batches[0][mine])), "blocks.3", "blocks.3.lin.bias")


def stage3_error(corpus: str, out: Path) -> None:
    """An error in a block's forward on every rank, the next block's gather in flight: the
    process must still end cleanly (its receive buffer outlives MPI_Finalize)."""
    from moecore.distributed import in_flight

    group = dist.init()
    batches, mine, _ = _plain(group, 13)
    net = _Net(3, 3)
    zero = ZeRO(net, group, stage=3)

    def fail():
        assert zero.sharded.units[3].pending, "block 2's gather is not in flight"
        raise RuntimeError("a bad batch")

    object.__setattr__(net.blocks[1], "probe", fail)
    try:
        net(mc.Tensor(batches[0][mine]))
    except RuntimeError as exc:
        assert "a bad batch" in str(exc)
    else:
        raise AssertionError("the forward did not raise")
    assert in_flight.count() >= 1, "no gather was left in flight: the case is not tested"
    # Returning frees the wrapper and its parameter memory; MPI_Finalize comes at exit.


if __name__ == "__main__":
    mode, corpus, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    modes = {"nonfinite": nonfinite, "reduce_scatter": reduce_scatter, "stage3": stage3}
    modes["stage3_two"] = stage3_two
    modes["stage3_error"] = stage3_error
    modes[mode](corpus, out)
    if dist.init().rank == 0:
        print(f"OK {mode} size={dist.init().size}")
