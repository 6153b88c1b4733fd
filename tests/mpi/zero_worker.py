"""Run under ``mpiexec -n P python -m mpi4py zero_worker.py MODE CORPUS OUT``; raises (and so
aborts every rank) when a check fails. Rank 0 prints ``OK <mode>`` at the end.

Modes:
- ``nonfinite``: ``--zero 2`` on P ranks, rank 1's embedding NaN (after the broadcast of
  the initial parameters): the global norm is NaN on every rank, so every rank skips the
  same steps and stops with ``TrainingDiverged`` after ``max_bad_steps``.
- ``reduce_scatter``: the group's reduce-scatter with uneven counts against numpy.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

import moecore.distributed as dist
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
    sum of every rank's array, which each rank rebuilds from the ranks' seeds."""
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


if __name__ == "__main__":
    mode, corpus, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    {"nonfinite": nonfinite, "reduce_scatter": reduce_scatter}[mode](corpus, out)
    if dist.init().rank == 0:
        print(f"OK {mode} size={dist.init().size}")
