"""Call overhead of two builds of the extension, side by side: e.g. the stable-ABI (abi3)
wheel against a build for one CPython version; or (``--suite tensor``) of two checkouts' Python
layer: ``Tensor`` operators and methods on tiny tensors, recorded for backward.

Two builds of ``moecore._core`` cannot share an interpreter, so each build runs in its own
worker process, given as ``NAME=DIR`` where DIR holds an importable ``moecore`` package (an
unpacked wheel, or ``python/`` of a checkout with its compiled extension). The parent asks the
workers in turn, round after round (the order alternating), to time a batch of calls of each
kernel; a worker answers with the mean time of one call in that batch. The table shows,
per kernel, each build's median over the rounds and the median of the per-round ratios
second / first with its 95 % interval. The inputs are tiny (a few dozen floats), so the time
is the binding's: argument extraction, the numpy C API, result objects, the GIL release; one
call at a training shape shows how large that is next to a kernel's real work.

Run:
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/call_overhead.py \\
      cp311=python abi3=/tmp/abi3-wheel-unpacked [--rounds 31] [--calls 2000]
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/call_overhead.py \\
      --suite tensor before=/path/to/old/python after=python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import median_interval, table, write_results


def _kernels() -> dict[str, tuple[Callable[[], Any], int]]:
    """The calls the workers time, each with the divisor of the batch size for it: bindings
    with tiny inputs, and one at a training shape for scale (imported in the worker)."""
    import numpy as np

    from moecore import _core

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 8), dtype=np.float32)
    x = rng.standard_normal((4, 16), dtype=np.float32)
    experts = np.array([[0, 1], [2, 3], [1, 0], [3, 2]], dtype=np.int32)
    grad = rng.standard_normal(64, dtype=np.float32)
    small = rng.standard_normal(16, dtype=np.float32)
    pool = _core.PoolCore()

    # One call at the shapes of benches/py/moe_kernels.py (T = 4096, d = 256, E = 8, k = 2),
    # to set the tiny calls' differences against a kernel's real time.
    big_x = rng.standard_normal((4096, 256), dtype=np.float32)
    big_experts = np.stack([np.arange(4096) % 8, (np.arange(4096) + 1) % 8], axis=1)
    big_experts = big_experts.astype(np.int32)

    def malloc_free() -> None:
        pool.free(pool.malloc(256))

    return {
        "bsr_kernel_isa()": (_core.bsr_kernel_isa, 1),
        "fused_gelu(16 f32)": (lambda: _core.fused_gelu(small), 1),
        "moe_route(4x8, k=2)": (lambda: _core.moe_route(logits, 2), 1),
        "moe_permute(4x16, k=2)": (lambda: _core.moe_permute(x, experts, 4), 1),
        "compress_topk(64 f32, k=4)": (lambda: _core.compress_topk(grad, 4), 1),
        "PoolCore.malloc+free": (malloc_free, 1),
        "moe_permute(4096x256, k=2)": (lambda: _core.moe_permute(big_x, big_experts, 8), 200),
    }


def _tensor_calls() -> dict[str, tuple[Callable[[], Any], int]]:
    """Tensor operators and methods on tiny tensors that require grad (so each call records
    its Function), and one backward through a small graph: the Python layer's own cost."""
    import numpy as np

    import moecore

    rng = np.random.default_rng(0)
    x = moecore.tensor(rng.standard_normal((4, 8)), dtype=np.float32, requires_grad=True)
    w = moecore.tensor(rng.standard_normal((8, 8)), dtype=np.float32, requires_grad=True)
    rows = np.array([0, 2, 3])

    def step() -> None:
        ((x @ w).tanh() * 2.0 - x).mean().backward()

    return {
        "x + y": (lambda: x + x, 1),
        "x * 2.0": (lambda: x * 2.0, 1),
        "1.0 - x": (lambda: 1.0 - x, 1),
        "x @ w": (lambda: x @ w, 1),
        "x.exp()": (x.exp, 1),
        "x.sum(axis=1)": (lambda: x.sum(axis=1), 1),
        "x.reshape(8, 4)": (lambda: x.reshape(8, 4), 1),
        "x.T": (lambda: x.T, 1),
        "x[rows]": (lambda: x[rows], 1),
        "forward+backward (5 ops)": (step, 5),
    }


SUITES = {"bindings": _kernels, "tensor": _tensor_calls}


def _worker(suite: str) -> None:
    """Reads a batch size per line from stdin; answers with one JSON line of seconds per
    call for each kernel."""
    import moecore

    kernels = SUITES[suite]()
    for f, _ in kernels.values():  # a failing kernel stops the worker before any timing
        f()
    print(json.dumps({"extension": moecore._core.__file__, "kernels": list(kernels)}), flush=True)
    for line in sys.stdin:
        out = {}
        for name, (f, divisor) in kernels.items():
            calls = max(1, int(line) // divisor)
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            out[name] = (time.perf_counter() - t0) / calls
        print(json.dumps(out), flush=True)


def _start(directory: str, suite: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(Path(directory).resolve()))
    proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", suite],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).parent,
    )
    return proc, _reply(proc)


def _reply(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker exited (code {proc.wait()}): see its traceback above")
    return json.loads(line)


def _ask(proc: subprocess.Popen[str], calls: int) -> dict[str, float]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{calls}\n")
    proc.stdin.flush()
    return _reply(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs=2, metavar="NAME=DIR", help="the two builds")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--calls", type=int, default=2000, help="calls per batch")
    parser.add_argument(
        "--suite", choices=sorted(SUITES), default="bindings", help="which calls to time"
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.calls < 1:
        raise SystemExit("--rounds and --calls must be >= 1")
    builds = dict(b.split("=", 1) for b in args.builds)
    if len(builds) != 2:
        raise SystemExit("give two builds with different names: NAME=DIR NAME=DIR")
    workers = {}
    for name, directory in builds.items():
        workers[name], hello = _start(directory, args.suite)
        print(f"{name}: {hello['extension']}")
    names = list(workers)
    try:
        for proc in workers.values():  # warm-up: first calls, page faults, thread pools
            _ask(proc, args.calls)
        samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                samples[name].append(_ask(workers[name], args.calls))
    finally:
        for proc in workers.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
    first, second = names
    rows, results = [], {}
    for kernel in samples[first][0]:
        a = [s[kernel] for s in samples[first]]
        b = [s[kernel] for s in samples[second]]
        ratios = [y / x for x, y in zip(a, b)]
        low, high = median_interval(ratios)
        ratio = statistics.median(ratios)
        results[kernel] = {
            f"{first}_ns": statistics.median(a) * 1e9,
            f"{second}_ns": statistics.median(b) * 1e9,
            "ratio": ratio,
            "ratio_low": low,
            "ratio_high": high,
        }
        rows.append(
            [
                kernel,
                f"{statistics.median(a) * 1e9:.0f}",
                f"{statistics.median(b) * 1e9:.0f}",
                f"{ratio:.3f} [{low:.3f}, {high:.3f}]",
            ]
        )
    print(
        f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}; "
        f"{args.rounds} rounds of {args.calls} calls, workers alternating; ns per call (median)"
    )
    print(table(rows, ["kernel", f"{first} ns", f"{second} ns", f"{second}/{first} [95 %]"]))
    suffix = "" if args.suite == "bindings" else f"_{args.suite}"
    path = write_results(f"call_overhead{suffix}", {"builds": builds, "results": results})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker(sys.argv[sys.argv.index("--worker") + 1])
    else:
        main()
