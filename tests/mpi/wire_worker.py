"""MPI worker for tests/test_grad_wire_mpi.py (run under ``mpiexec -n N``).

``allreduce``: the group's all-reduce of a bfloat16 buffer (blocking and non-blocking)
against the float64 sum of every rank's bfloat16 values, which each rank rebuilds from
the ranks' seeds; every rank must hold the same bits.
"""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np

import moecore.distributed as dist

BF16 = np.dtype(ml_dtypes.bfloat16)


def allreduce() -> None:
    group = dist.init()
    n = 10_007  # odd: no algorithm splits it evenly

    def values_of(rank: int) -> np.ndarray:
        x = np.random.default_rng(11 + rank).standard_normal(n).astype(np.float32)
        x[:5] = [0.0, 1e30, -1e30, 3.0e-39, 1.0]  # zero, large, subnormal in bf16
        return x.astype(BF16)

    inputs = [values_of(r).astype(np.float64) for r in range(group.size)]
    exact = sum(inputs)
    magnitude = sum(np.abs(x) for x in inputs)
    for blocking in (True, False):
        buf = values_of(group.rank)
        if blocking:
            group.allreduce(buf)
        else:
            group.iallreduce(buf).wait()
        got = buf.astype(np.float64)
        # Each of the P - 1 additions rounds a partial sum (|partial| <= Σ|x|) to bf16 (8
        # significant bits: at most 2^-8 of it), plus float32's rounding of the addition.
        bound = (group.size - 1) * (2.0**-8 + 2.0**-24) * magnitude
        worst = float(np.max(np.abs(got - exact) - bound))
        assert worst <= 0, f"rank {group.rank}: bf16 sum off by {worst} beyond the bound"
        if group.size == 2:  # one addition: exactly bf16(float32(a) + float32(b))
            a, b = (values_of(r).astype(np.float32) for r in range(2))
            np.testing.assert_array_equal(buf.view(np.uint16), (a + b).astype(BF16).view(np.uint16))
        bits = np.empty((group.size, n), dtype=np.uint16)
        group.allgather(buf.view(np.uint16), bits)
        assert (bits == bits[0]).all(), "ranks hold different sums"
    try:
        group.allreduce(values_of(group.rank), op="max")
    except ValueError as exc:
        assert "reduced by 'sum' only" in str(exc), exc
    else:
        raise AssertionError("a bf16 max all-reduce was accepted")


if __name__ == "__main__":
    mode = sys.argv[1]
    {"allreduce": allreduce}[mode]()
    if dist.init().rank == 0:
        print(f"OK {mode} size={dist.init().size}")
