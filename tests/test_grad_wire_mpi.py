"""The bf16 wire format of dense gradient buckets (``grad_wire_dtype = "bf16"``): MPI's
all-reduce of bfloat16 buffers against numpy, and a data-parallel run with it against the
same run in float32."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from parallel_harness import Tolerance, assert_runs_agree, launch, mpiexec, train_run

from moecore.errors import ConfigError
from moecore.train.config import build_config


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_bf16_allreduce_sums_in_float32_and_every_rank_gets_the_same_bits(n):
    worker = Path(__file__).parent / "mpi" / "wire_worker.py"
    cmd = [*mpiexec(n), sys.executable, "-m", "mpi4py", str(worker), "allreduce"]
    code, text, _ = launch(cmd, timeout=120)
    assert code == 0, text
    assert f"OK allreduce size={n}" in text, text


# Each element of an averaged gradient carries up to two bf16 roundings at P = 2 (2^-8 of
# it each), so the gradient norm may move by ~2^-8 relative at most; the parameters and the
# loss follow through AdamW's normalised updates. Measured worst over 20 steps (AMD EPYC
# Zen 3, MPICH): loss 2.7e-4 (absolute), gradient norm 7.1e-4 (relative), parameter
# checksums 2.4e-3. Bounds: 2^-8 for the gradient norm, the others ~4-7x what was measured.
# ZeRO stage 1 and plain data parallelism, both with the bf16 wire. Their float32 gradients
# differ by rounding; where that moves an element across a bf16 rounding boundary, the wire
# turns it into a 2^-8 step, which the parameter checksums show. Measured worst over 20
# steps (Zen 3, MPICH): loss 4.8e-7, gradient norm 3.6e-7, checksums 1.3e-5 — against 2.7e-4,
# 7.1e-4 and 2.4e-3 between the bf16 and the float32 wire, so a ZeRO that ignored the wire
# would fail the loss and gradient-norm bounds (ZeRO's own 1e-5) by far.
ZERO1_BF16_WIRE = Tolerance("ZeRO-1 and plain DP, both on the bf16 wire", 1e-5, 1e-5, 1e-4)
BF16_WIRE = Tolerance(
    "gradients rounded to bf16 on the wire", loss=2e-3, grad_norm=2**-8, params=1e-2
)


@pytest.mark.mpi
def test_dp2_with_the_bf16_wire_follows_the_float32_run(tmp_path, corpus):
    """Every bucket crosses as bfloat16 (relative error up to 2^-8 per element): the loss and
    gradient-norm curves stay within the bound below of the same run in float32; the
    gradient norms differ at all (the wire is really bf16)."""
    args = ["--preset", "moe-tiny", "--data", str(corpus), "--dp", "2", "--set", "steps=20"]
    args += ["eval_every=0", "checkpoint_every=0", "seq_len=32", "batch_size=8"]
    ref = train_run(tmp_path / "f32", 2, args, reference=True)
    got = train_run(tmp_path / "bf16", 2, [*args, "--set", "grad_wire_dtype=bf16"])
    worst = assert_runs_agree(ref, got, BF16_WIRE)
    assert worst["grad_norm"] > 0, "the gradients were not rounded: is the wire float32?"


@pytest.mark.mpi
def test_zero1_with_the_bf16_wire_equals_plain_data_parallelism_with_it(tmp_path, corpus):
    """ZeRO stage 1 all-reduces the same buckets through the same wire, then each rank
    updates its part: the curve of plain data parallelism with the bf16 wire (bounds
    beside ``ZERO1_BF16_WIRE``)."""
    args = ["--preset", "moe-tiny", "--data", str(corpus), "--dp", "2", "--set", "steps=20"]
    args += ["eval_every=0", "checkpoint_every=0", "seq_len=32", "batch_size=8"]
    args += ["grad_wire_dtype=bf16"]
    plain = train_run(tmp_path / "plain", 2, args)
    zero1 = train_run(tmp_path / "zero1", 2, [*args, "--set", "zero=1"])
    assert_runs_agree(plain, zero1, ZERO1_BF16_WIRE)


def test_zero_refuses_the_bf16_wire_from_stage_2():
    import moecore.distributed as dist
    from moecore import nn
    from moecore.distributed.zero import ZeRO

    with pytest.raises(ValueError, match="stages 2 and 3 reduce-scatter"):
        ZeRO(nn.Linear(4, 4), dist.init(), stage=2, wire_dtype="bfloat16")


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        ({"compress": "topk:0.01"}, "compress (topk:0.01)"),
        ({"zero": 2}, "zero (2)"),
        ({"pp": 2, "grad_accum": 2}, "pp (2)"),
        ({"dp": 2, "ranks_per_node": 2}, "ranks_per_node (2)"),
    ],
)
def test_the_bf16_wire_is_refused_where_it_would_not_apply(sets, named):
    with pytest.raises(ConfigError, match=re.escape(f"grad_wire_dtype 'bf16' with {named}")):
        build_config("moe-tiny", overrides={"grad_wire_dtype": "bf16", **sets})
