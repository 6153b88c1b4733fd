"""Pipeline parallelism end to end: ``mpiexec -n pp·dp moecore train --pp …`` follows one
process running the same micro-batches as gradient accumulation (``grad_accum =
micro_batches``), step by step, within float32 summation order (the proof harness)."""

from __future__ import annotations

import pytest
from parallel_harness import Tolerance, assert_runs_agree, launch, mpiexec, train_run
from parallel_harness import entry as _entry

pytestmark = [pytest.mark.mpi]

# moe-tiny with 4 layers (pp = 2 with 2 virtual stages, or pp = 4, needs 4 stages), AdamW's
# eps at 1e-6 for the reason test_dist_mpi.py's EXACT_SETS gives; the MoE aux loss stays on:
# every micro-batch's is that of one process.
SETS = ["eps=1e-6", "n_layers=4", "eval_every=0", "checkpoint_every=0", "seq_len=32"]
#: The issue's bound on the curves: 1e-5 relative (the loss, ~5, compared absolutely: 5e-5).
#: Parameter checksums as test_dist_mpi.py's ROUNDING (2e-5): pp 2 × dp 2 measured 1.26e-5
#: on Σ² of a layer-norm bias whose norm is 0.03 (the data-parallel summation order); the
#: pure pipelines stay below 4e-7 everywhere (measured, MPICH, Zen 3).
PIPELINE = Tolerance("1e-5 relative (issue 31)", loss=5e-5, grad_norm=1e-5, params=2e-5)


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
    ("pp", "schedule", "m"),
    [
        (2, "gpipe", 4),
        (2, "1f1b", 4),
        (2, "interleaved", 4),
        (2, "dualpipe", 4),
        (4, "gpipe", 8),
        (4, "1f1b", 8),
        (4, "interleaved", 8),
        (4, "dualpipe", 8),
    ],
)
def test_pipeline_follows_gradient_accumulation(tmp_path, corpus, reference, pp, schedule, m):
    got = train_run(
        tmp_path / "pp",
        pp,
        [*_args(corpus, m), "--pp", str(pp), "--schedule", schedule],
        timeout=600,
    )
    worst = assert_runs_agree(reference(m), got, PIPELINE)
    print(f"pp={pp} {schedule} m={m}: worst {worst}")


def test_pp2_dp2_follows_gradient_accumulation(tmp_path, corpus, reference):
    """pp 2 × dp 2: each data-parallel replica takes half the rows; with aux_loss on, the
    reference is one process (the aux loss per micro-batch and rank is plain data
    parallelism's documented difference, so it is off on both sides)."""
    ref = train_run(tmp_path / "ref", 1, _args(corpus, 4, "--set", "aux_loss=0"))
    got = train_run(
        tmp_path / "pp",
        4,
        [*_args(corpus, 4, "--set", "aux_loss=0"), "--pp", "2", "--dp", "2"],
        timeout=600,
    )
    print(f"pp=2 dp=2: worst {assert_runs_agree(ref, got, PIPELINE)}")


def test_mismatched_pp_schedule_is_refused_on_every_rank(tmp_path, corpus):
    """Rank 1 asks for another schedule: every rank refuses (the config agreement)."""
    base = [*_entry(), "train", "--out", str(tmp_path / "run"), *_args(corpus, 4, steps=2)]
    cmd = [*mpiexec(1), *base, "--pp", "2", "--schedule", "1f1b", ":"]
    cmd += ["-n", "1", *base, "--pp", "2", "--schedule", "gpipe"]
    code, out, _ = launch(cmd, timeout=120)
    assert code != 0, out
    assert "pp_schedule" in out, out
