"""Pipeline parallelism end to end: ``mpiexec -n pp·dp moecore train --pp …`` follows one
process running the same micro-batches as gradient accumulation (``grad_accum =
micro_batches``), step by step, within float32 summation order (the proof harness)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from parallel_harness import (
    Tolerance,
    assert_runs_agree,
    cli,
    launch,
    mpiexec,
    read_records,
    train_run,
)
from parallel_harness import entry as _entry

pytestmark = [pytest.mark.mpi]

# moe-tiny with 4 layers (pp = 2 with 2 virtual stages, or pp = 4, needs 4 stages), AdamW's
# eps at 1e-6 for the reason test_dist_mpi.py's EXACT_SETS gives; the MoE aux loss stays on:
# every micro-batch's is that of one process.
SETS = ["eps=1e-6", "n_layers=4", "eval_every=0", "checkpoint_every=0", "seq_len=32"]
#: The issue's bound: 1e-5 relative (the loss, ~5, compared absolutely: 5e-5), parameter
#: checksums included. Measured worst over 20 steps (MPICH and Open MPI, Zen 3): loss 2.4e-7,
#: gradient norm 6.8e-8, checksums 4e-7.
PIPELINE = Tolerance("1e-5 relative (issue 31)", loss=5e-5, grad_norm=1e-5, params=1e-5)


def _args(corpus, m, *extra, steps=20):
    args = ["--preset", "moe-tiny", "--data", str(corpus), "--set", f"steps={steps}"]
    return [*args, f"grad_accum={m}", *SETS, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """One process, grad_accum = m, per micro-batch count."""
    cache = {}

    def get(m):
        if m not in cache:
            out = tmp_path_factory.mktemp(f"ref{m}")
            cache[m] = train_run(out / "run", 1, _args(corpus, m))
        return cache[m]

    return get


@pytest.mark.parametrize(
    ("pp", "schedule", "m", "extra"),
    [
        (2, "gpipe", 4, []),
        (2, "1f1b", 4, []),
        (2, "interleaved", 4, []),
        (2, "dualpipe", 4, []),
        (4, "gpipe", 8, []),
        (4, "1f1b", 8, []),
        (4, "interleaved", 8, []),
        (4, "dualpipe", 8, []),
        (2, "1f1b", 4, ["--pp-balance", "profile"]),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else str(v),
)
def test_pipeline_follows_gradient_accumulation(
    tmp_path, corpus, reference, pp, schedule, m, extra
):
    got = train_run(
        tmp_path / "pp",
        pp,
        [*_args(corpus, m), "--pp", str(pp), "--schedule", schedule, *extra],
        timeout=600,
    )
    worst = assert_runs_agree(reference(m), got, PIPELINE)
    print(f"pp={pp} {schedule} m={m} {extra}: worst {worst}")


# The composed layouts run two schedules in the default suite (CI's 2 cores); all four with
# MOECORE_TEST_FULL_MATRIX=1 (run under MPICH and Open MPI before a release, see
# docs/pipeline.md).
FULL_MATRIX = os.environ.get("MOECORE_TEST_FULL_MATRIX") == "1"


def _matrix(*always: str) -> list[Any]:
    return [
        s
        if s in always
        else pytest.param(
            s,
            marks=pytest.mark.skipif(
                not FULL_MATRIX,
                reason="one of the full schedule matrix: MOECORE_TEST_FULL_MATRIX=1",
            ),
        )
        for s in ("gpipe", "1f1b", "interleaved", "dualpipe")
    ]


@pytest.mark.parametrize("schedule", _matrix("1f1b"))
def test_pp2_dp2_follows_plain_data_parallelism(tmp_path, corpus, schedule):
    """pp 2 × dp 2 follows dp 2 with grad_accum = micro_batches (the issue's reference where
    dp > 1): each replica takes half the rows, the MoE aux loss is per rank in both."""
    ref = train_run(tmp_path / "ref", 2, [*_args(corpus, 4), "--dp", "2"], reference=True)
    args = [*_args(corpus, 4), "--pp", "2", "--dp", "2", "--schedule", schedule]
    got = train_run(tmp_path / "pp", 4, args, timeout=600)
    print(f"pp=2 dp=2 {schedule}: worst {assert_runs_agree(ref, got, PIPELINE)}")


@pytest.mark.parametrize("schedule", _matrix("1f1b", "dualpipe"))
def test_pp2_ep2_follows_one_process(tmp_path, corpus, reference, schedule):
    """pp 2 × ep 2: each stage's MoE layers exchange tokens between its 2 ranks; the aux
    loss over the stage's ranks is one process's, so the reference is one process."""
    args = [*_args(corpus, 4), "--pp", "2", "--ep", "2", "--schedule", schedule]
    got = train_run(tmp_path / "pp", 4, args, timeout=600)
    print(f"pp=2 ep=2 {schedule}: worst {assert_runs_agree(reference(4), got, PIPELINE)}")


@pytest.mark.parametrize(
    ("rank1", "difference"),
    [
        (
            ["--pp", "2", "--schedule", "gpipe"],
            "pp_schedule is '1f1b' on rank 0 but 'gpipe' on rank 1",
        ),
        (["--pp", "1"], "pp is 2 on rank 0 but 1 on rank 1"),
    ],
)
def test_mismatched_pp_or_schedule_is_refused_on_every_rank(tmp_path, corpus, rank1, difference):
    """Rank 1 launched with another schedule or pp (MPMD): every rank refuses, naming it."""
    base = [*_entry(), "train", "--out", str(tmp_path / "run"), *_args(corpus, 4, steps=2)]
    cmd = [*mpiexec(1), *base, "--pp", "2", "--schedule", "1f1b", ":", "-n", "1", *base, *rank1]
    code, out, seconds = launch(cmd, timeout=120)
    assert code != 0, out
    assert out.count(difference) == 2, out
    assert seconds < 60, f"took {seconds:.1f} s"


WORKER = Path(__file__).parent / "mpi" / "pipeline_worker.py"


@pytest.mark.parametrize("mode", ["stuck", "killed"])
def test_a_stage_that_hangs_or_dies_ends_the_job_naming_stage_and_operation(mode):
    code, out, seconds = launch(
        [*mpiexec(2), sys.executable, "-m", "mpi4py", str(WORKER), mode], timeout=90
    )
    assert code != 0, out
    assert f"STAGE 1 {mode} in micro-batch 1" in out, out
    if mode == "stuck":
        # 1F1B on 2 ranks: stage 0 sent micro-batch 1's activation and got micro-batch 0's
        # gradient; it waits for micro-batch 1's, which stage 1 never computes.
        assert (
            "moecore: waiting for pipeline stage 0 (pipeline rank 0): receiving the backward "
            "message of micro-batch 1 from stage 1 on pipeline rank 1 on rank 0 of 2 did not "
            "complete within 2 s"
        ) in out, out
    assert "finished?" not in out, out
    assert seconds < 30, f"took {seconds:.1f} s"


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe"])
def test_pp2_with_mtp_follows_one_process(tmp_path, corpus, schedule):
    """The multi-token-prediction module runs with the head on the last stage (DualPipe:
    on both ranks, for the two directions' micro-batches): one process with grad_accum = m."""
    mtp = ["--set", "mtp_depth=1"]
    ref = train_run(tmp_path / "ref", 1, [*_args(corpus, 4), *mtp])
    got = train_run(
        tmp_path / "pp", 2, [*_args(corpus, 4), *mtp, "--pp", "2", "--schedule", schedule]
    )
    print(f"pp=2 mtp {schedule}: worst {assert_runs_agree(ref, got, PIPELINE)}")


def test_pp2_dp2_ep2_follows_dp2_ep2(tmp_path, corpus):
    """All three at once on 8 ranks (2 cores, oversubscribed): each stage's 4 ranks are a
    dp 2 × ep 2 layout; the reference is dp 2 × ep 2 with grad_accum = micro_batches. Ten
    steps (~40 s with its reference on 2 cores)."""
    args = [*_args(corpus, 4, steps=10), "--dp", "2", "--ep", "2"]
    ref = train_run(tmp_path / "ref", 4, args, timeout=600)
    got = train_run(tmp_path / "pp", 8, [*args, "--pp", "2"], timeout=900)
    print(f"pp=2 dp=2 ep=2: worst {assert_runs_agree(ref, got, PIPELINE)}")


def test_checkpoint_from_pp2_resumes_in_one_process_and_back(tmp_path, corpus, reference):
    """Checkpoints do not depend on pp: 10 steps with pp 2 then 10 in one process (and the
    other way round) follow the 20-step single-process curve."""
    base = [*_args(corpus, 4, steps=10), "--set", "checkpoint_every=10"]
    train_run(tmp_path / "a", 2, [*base, "--pp", "2", "--schedule", "dualpipe"])
    cli(1, ["train", "--resume", str(tmp_path / "a"), "--pp", "1", "--set", "steps=20"])
    train_run(tmp_path / "b", 1, base)
    cli(2, ["train", "--resume", str(tmp_path / "b"), "--pp", "2", "--set", "steps=20"])
    for run in ("a", "b"):
        assert_runs_agree(reference(4), read_records(tmp_path / run), PIPELINE)


def test_pp2_ep2_evaluates_and_its_checkpoint_resumes_in_one_process(tmp_path, corpus):
    """Validation runs through the stages (the same val_loss as one process), and a
    pp 2 × ep 2 checkpoint — experts written by the ranks holding them — resumes in one
    process on the one-process curve."""
    base = [*_args(corpus, 4, steps=6), "--set", "eval_every=3", "checkpoint_every=6"]
    ref = train_run(tmp_path / "ref", 1, [*_args(corpus, 4, steps=12), "--set", "eval_every=3"])
    train_run(tmp_path / "pp", 4, [*base, "--pp", "2", "--ep", "2"], timeout=600)
    cli(
        1,
        ["train", "--resume", str(tmp_path / "pp"), "--pp", "1", "--ep", "1", "--set", "steps=12"],
    )
    got = read_records(tmp_path / "pp")
    assert_runs_agree(ref, got, PIPELINE)
    vals = [(r["step"], r["val_loss"]) for r in got if "val_loss" in r]
    assert [s for s, _ in vals] == [3, 6, 9, 12], vals
    for (step, val), r in zip(vals, [r for r in ref if "val_loss" in r]):
        assert abs(val - r["val_loss"]) <= PIPELINE.loss, (step, val, r["val_loss"])
