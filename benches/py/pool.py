"""HostPool.empty + one write against numpy.empty + the same write, and the random trace.

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/pool.py [--quick]

For each size (4 KiB … 256 MiB) both sides get a buffer, fill it once and drop it, in
alternating rounds so that machine noise hits both alike; the table reports the median time
per (get + write + drop) and the ratio numpy / pool (> 1: the pool is faster), then the
median of the per-round ratios (each round times both sides back to back, so slow host
phases cancel out of it) with a distribution-free 95 % interval for that median. numpy.empty
hands out fresh pages from the OS at large sizes (a page fault per page on first write);
the pool hands back the warm pages of the previous round. A second table times get + drop
without the write: the allocators' own cost per call, which is all that differs between the
two sides where both reuse the same warm block (below glibc's mmap threshold, which grows to
32 MiB once such blocks are freed). Then RMM's random workload
(1 KiB … 64 MiB, 16000 MiB live cap) is replayed and its fragmentation reported.
Results go to benches/results/pool.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info

from moecore.pool import HostPool, random_trace, replay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_interval

KIB, MIB = 1 << 10, 1 << 20
SIZES = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB]


HEADER = (
    f"{'size':>8} {'numpy.empty':>14} {'HostPool.empty':>14} {'speedup':>10} "
    f"{'paired':>10}  95% interval of the paired median"
)


def label(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def check_correctness() -> None:
    pool = HostPool()
    for n in (4 * KIB, 3 * MIB):
        a = pool.empty(n, np.uint8)
        a.fill(7)
        ref = np.empty(n, np.uint8)
        ref.fill(7)
        np.testing.assert_array_equal(a, ref)
        v = a[::3]
        del a
        assert v.sum() == 7 * ((n + 2) // 3)
        del v
    assert pool.stats()["allocated_bytes.all.current"] == 0, "arrays did not return memory"


def time_rounds(get, n: int, calls: int, write: bool = True) -> float:
    """Seconds per (get + fill + drop), or (get + drop) without `write`, averaged over
    `calls` back-to-back calls."""
    t0 = time.perf_counter()
    if write:
        for _ in range(calls):
            a = get(n, np.uint8)
            a.fill(1)
            del a
    else:
        for _ in range(calls):
            a = get(n, np.uint8)
            del a
    return (time.perf_counter() - t0) / calls


def bench_sizes(rounds: int, write: bool = True) -> list[dict]:
    pool = HostPool()
    rows = []
    for n in SIZES:
        # About 20 ms of work per round, at least one call.
        one = time_rounds(np.empty, n, 1, write)
        calls = max(1, min(20_000, int(0.02 / max(one, 1e-7))))
        time_rounds(pool.empty, n, calls, write)  # warm the pool's segment for this size
        t_np, t_pool = [], []
        for r in range(rounds):
            # Alternate which side goes first, so neither always follows the other.
            if r % 2:
                t_pool.append(time_rounds(pool.empty, n, calls, write))
                t_np.append(time_rounds(np.empty, n, calls, write))
            else:
                t_np.append(time_rounds(np.empty, n, calls, write))
                t_pool.append(time_rounds(pool.empty, n, calls, write))
        med_np, med_pool = statistics.median(t_np), statistics.median(t_pool)
        # Each round's ratio compares two measurements taken back to back, so host noise
        # that lasts longer than a round cancels out of it.
        ratios = [a / b for a, b in zip(t_np, t_pool, strict=True)]
        low, high = median_interval(ratios)
        rows.append(
            {
                "size": n,
                "calls_per_round": calls,
                "rounds": rounds,
                "numpy_s": med_np,
                "pool_s": med_pool,
                "speedup": med_np / med_pool,
                "paired_speedup_median": statistics.median(ratios),
                "paired_speedup_95ci": [low, high],
                "numpy_min_s": min(t_np),
                "pool_min_s": min(t_pool),
            }
        )
        print(
            f"{label(n):>8} {med_np * 1e6:14.3f} {med_pool * 1e6:14.3f} {med_np / med_pool:9.2f}x"
            f" {statistics.median(ratios):9.3f}x  [{low:.3f}, {high:.3f}]",
            flush=True,
        )
    assert pool.stats()["allocated_bytes.all.current"] == 0
    return rows


def bench_trace(n_allocations: int) -> dict:
    trace = random_trace(n_allocations, 1 * KIB, 64 * MIB, 16000 * MIB, seed=0)
    t0 = time.perf_counter()
    r = replay(trace)
    r["seconds"] = time.perf_counter() - t0
    r["events"] = len(trace)
    r["n_allocations"] = n_allocations
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, N = 10^4 trace only")
    ap.add_argument("--rounds", type=int, default=21, help="alternating rounds per size")
    args = ap.parse_args()
    rounds = 5 if args.quick else args.rounds

    check_correctness()
    blas = [
        {k: i.get(k) for k in ("internal_api", "version", "threading_layer", "architecture")}
        for i in threadpool_info()
    ]
    print(f"numpy {np.__version__}; BLAS: {blas}")
    print("\nempty + fill once + drop, median time per call (us)")
    print(HEADER)
    rows = bench_sizes(rounds)
    # Without the write: the allocator's own cost (both sides hand back the same warm
    # block round after round below glibc's mmap threshold, so the write costs the same).
    print("\nempty + drop, no write, median time per call (us)")
    print(HEADER)
    bare = bench_sizes(rounds, write=False)

    print("\nRMM random workload replay (1 KiB..64 MiB, 73% alloc, 16000 MiB cap)")
    print(f"{'N':>8} {'peak alloc MiB':>15} {'peak resv MiB':>14} {'fragm.':>8} {'segments':>9}")
    traces = []
    for n in [10_000] if args.quick else [10_000, 100_000]:
        r = bench_trace(n)
        traces.append(r)
        print(
            f"{n:>8} {r['peak_allocated'] / MIB:15.0f} {r['peak_reserved'] / MIB:14.0f} "
            f"{r['fragmentation']:8.4f} {r['segments_obtained']:9d}"
        )

    out = Path(__file__).resolve().parents[1] / "results" / "pool.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": platform.machine(),
                "numpy": np.__version__,
                "blas": blas,
                "empty_write": rows,
                "empty_no_write": bare,
                "random_trace": traces,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
