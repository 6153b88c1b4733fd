"""ZeRO stages 1 and 2 (``--zero N``) against plain data parallelism on the same ranks:
20 steps of moe-tiny, every step's loss, gradient norm and parameter checksums."""

from __future__ import annotations

import pytest
from parallel_harness import Tolerance, assert_runs_agree, launch, mpiexec, read_records, train_run
from parallel_harness import entry as _entry

pytestmark = [pytest.mark.mpi]

# The bound: 1e-5 relative on the loss and gradient-norm curves. The parameters
# are held to the same figure relative to each tensor's norm.
ZERO_TOL = Tolerance("ZeRO against plain data parallelism", loss=1e-5, grad_norm=1e-5, params=1e-5)
# As tests/test_dist_mpi.py's EXACT_SETS: eps keeps float32 noise below AdamW's step.
SETS = ["--set", "eps=1e-6"]


def _run(tmp_path, corpus, name, n, *extra, steps=20):
    args = ["--preset", "moe-tiny", "--data", str(corpus), "--set", f"steps={steps}"]
    args += ["eval_every=0", "checkpoint_every=0", "seq_len=32", "batch_size=8", *SETS[1:]]
    records = train_run(tmp_path / name, n, [*args, *extra])
    assert len(records) == steps
    return records


def _relative_loss(ref, got):
    return max(abs(g["loss"] - r["loss"]) / abs(r["loss"]) for r, g in zip(ref, got))


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_equals_plain_data_parallelism(tmp_path, corpus, n, stage):
    """Loss, gradient-norm and parameter curves of ``--zero stage`` on n ranks equal plain
    data parallelism's on the same n ranks within 1e-5 relative."""
    plain = _run(tmp_path, corpus, "plain", n, "--dp", str(n))
    zero = _run(tmp_path, corpus, "zero", n, "--dp", str(n), "--zero", str(stage))
    worst = assert_runs_agree(plain, zero, ZERO_TOL)
    print(f"zero={stage} n={n}: worst {worst}, loss relative {_relative_loss(plain, zero):.3g}")
