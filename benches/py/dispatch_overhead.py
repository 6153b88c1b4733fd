"""The cost of choosing a kernel: ops on tiny arrays, where the work is negligible and what
is measured is Python — argument handling, kernel selection, the autograd tape. Run it
under two trees to compare them (e.g. before and after a change to ``moecore.kernels``),
alternating, on the same machine::

    for tree in /path/before /path/after; do
        PYTHONPATH=$tree/python RAYON_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
            env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
            python benches/py/dispatch_overhead.py
    done

One thread each (rayon, OpenBLAS), so that thread wake-ups on a shared machine do not swamp
the Python being measured. Prints the median over rounds of the microseconds per call of each case.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

import moecore as mc
from moecore import nn, ops
from moecore.optim import AdamW

CALLS, ROUNDS = 300, 9


def _cases() -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    mc.manual_seed(0)
    x = mc.Tensor(rng.standard_normal((4, 8)).astype(np.float32), requires_grad=True)
    qkv = mc.Tensor(rng.standard_normal((1, 4, 24)).astype(np.float32), requires_grad=True)
    w = mc.Tensor(np.ones(8, np.float32), requires_grad=True)
    moe = nn.MoE(8, 16, n_experts=4, top_k=2)
    opt = AdamW(moe.parameters())

    def moe_step() -> None:
        opt.zero_grad()
        moe(x).sum().backward()
        opt.step()

    return {
        "gelu fwd+bwd": lambda: ops.gelu(x).sum().backward(),
        "layer_norm fwd+bwd": lambda: ops.layer_norm(x, w, None).sum().backward(),
        "packed_attention fwd+bwd": lambda: ops.packed_attention(qkv, 2).sum().backward(),
        "moe fwd+bwd + AdamW step": moe_step,
    }


def main() -> None:
    cases = _cases()
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(ROUNDS):
        for name, fn in cases.items():
            fn()  # warm
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            results[name].append((time.perf_counter() - t0) / CALLS * 1e6)
    print(f"{'case':<28} µs/call (median of {ROUNDS} rounds of {CALLS})")
    for name, times in results.items():
        print(f"{name:<28} {statistics.median(times):8.1f}")


if __name__ == "__main__":
    main()
