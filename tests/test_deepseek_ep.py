"""Expert parallelism with ``deepseek-tiny`` (MLA, fine-grained sigmoid-scored experts with
a shared one, the routed scale, aux-loss-free bias, the sequence-wise balance loss,
node-limited routing with groups inside the ranks, one MTP module): ``--ep 2`` and
``--dp 2 --ep 2`` follow the single-process run (tests/parallel_harness.py)."""

from __future__ import annotations

import pytest
from parallel_harness import Tolerance, assert_runs_agree, train_run

pytestmark = [pytest.mark.mpi]

# The bound: each step's loss within 1e-5 of one process's, and the gradient norm
# and parameter checksums at float32 summation-order level. eps = 1e-6 for the reason given
# in test_dist_mpi.py (AdamW amplifying rounding noise below eps).
WITHIN_1E5 = Tolerance("deepseek-tiny within 1e-5", loss=1e-5, grad_norm=1e-5, params=2e-5)


def _run(tmp_path, corpus, name, n, *extra, steps=12):
    args = ["--preset", "deepseek-tiny", "--data", str(corpus), "--set", f"steps={steps}"]
    args += ["eval_every=0", "checkpoint_every=0", "seq_len=32", "batch_size=8", "eps=1e-6"]
    # a sequence-wise loss strong enough that a wrong scale of its gradient would show
    args += ["seq_aux_loss=0.01"]
    records = train_run(tmp_path / name, n, [*args, *extra])
    assert len(records) == steps
    return records


@pytest.mark.parametrize(
    ("n", "layout"), [(2, ["--ep", "2"]), (4, ["--dp", "2", "--ep", "2"])], ids=["ep2", "dp2ep2"]
)
def test_deepseek_tiny_expert_parallel_equals_single_process(tmp_path, corpus, n, layout):
    single = _run(tmp_path, corpus, "single", 1)
    parallel = _run(tmp_path, corpus, "parallel", n, *layout)
    assert_runs_agree(single, parallel, WITHIN_1E5)
