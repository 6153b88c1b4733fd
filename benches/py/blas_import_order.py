"""Import order and OpenBLAS's spinning workers: one MoE layer (forward + backward, the
``moe_layer.py`` shape) and its six numpy expert GEMMs, timed in turn, in three kinds of
worker process:

- ``moecore first``: ``import moecore`` before numpy, so OpenBLAS reads moecore's
  ``OPENBLAS_THREAD_TIMEOUT=4`` when it loads;
- ``numpy first, no restart``: ``import numpy`` first with ``MOECORE_BLAS_RESTART=0`` — the
  behaviour before the restart: OpenBLAS's idle workers spin after every numpy product and
  take the cores from moecore's threads;
- ``numpy first``: ``import numpy`` first, moecore restarts OpenBLAS's pool with the short
  timeout at import (``moecore/_blas_env.py``).

Each round starts one worker of each kind, in a rotating order, so a slow phase of the shared
machine hits all alike; a worker reports the median of its repetitions, the table the median
over rounds and the layer's time over its floor. Also printed: the CPU time the process
burns while idle for 50 ms after a numpy product (the spinning itself).

Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/blas_import_order.py
     [--rounds 5] [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODES = {
    "moecore first": ("moecore", {}),
    "numpy first, no restart": ("numpy", {"MOECORE_BLAS_RESTART": "0"}),
    "numpy first": ("numpy", {}),
}


def worker(first: str, reps: int) -> None:
    """Times the layer and the floor in this process; prints one JSON line."""
    import time

    if first == "moecore":
        import moecore  # noqa: F401
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from moe_layer import D, E, H, T, gemm_floor, moecore_layer

    import moecore as mc

    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((T, D)).astype(np.float32),
        (rng.standard_normal((E, D)) / 16).astype(np.float32),
        (rng.standard_normal((E, D, H)) / 16).astype(np.float32),
        (rng.standard_normal((E, H, D)) / 22).astype(np.float32),
    ]
    dy = rng.standard_normal((T, D)).astype(np.float32)
    layer = moecore_layer(*[mc.Tensor(a, requires_grad=True) for a in arrays], dy)
    floor = gemm_floor(*arrays, dy)
    times: dict[str, list[float]] = {"layer": [], "floor": [], "idle_cpu": []}
    for i in range(reps + 2):
        for name, fn in (("floor", floor), ("layer", layer)):
            t0 = time.perf_counter()
            fn()
            if i >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
        floor()  # numpy products, then 50 ms idle: what do OpenBLAS's workers burn?
        c0 = time.process_time()
        time.sleep(0.05)
        times["idle_cpu"].append(time.process_time() - c0)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--worker", choices=["moecore", "numpy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.reps)
        return
    names = list(MODES)
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            first, extra = MODES[name]
            env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", first, "--reps", str(args.reps)],
                env={**env, **extra},
                capture_output=True,
                text=True,
                check=True,
            )
            results[name].append(json.loads(proc.stdout.splitlines()[-1]))
    print(f"MoE layer fwd+bwd and its six numpy GEMMs; {args.rounds} rounds x {args.reps} reps")
    print(f"{'worker':<26} {'layer ms':>9} {'floor ms':>9} {'layer/floor':>11} {'idle CPU ms':>11}")
    for name in names:
        med = {k: statistics.median(r[k] for r in results[name]) for k in results[name][0]}
        ratio = statistics.median(r["layer"] / r["floor"] for r in results[name])
        print(
            f"{name:<26} {med['layer'] * 1e3:>9.1f} {med['floor'] * 1e3:>9.1f} "
            f"{ratio:>11.2f} {med['idle_cpu'] * 1e3:>11.2f}"
        )


if __name__ == "__main__":
    main()
