"""Top-k gradient compression: moecore against numpy and PyTorch, side by side in one run.

Run (release build installed, e.g. ``maturin develop --release``)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/topk.py [--max-n 1e8]

For each n in {1e6, 1e7, 1e8} (float32) and ratio in {0.001, 0.01} it times, interleaved
round-robin so that machine noise hits every contender alike:

- moecore ``TopK.compress`` (selection + encoding into a payload): exact and sampled, each
  without and with error feedback;
- ``numpy.argpartition(abs(g))``, ``torch.topk(g.abs(), k)`` (when torch imports), and a
  numpy version of the sampled threshold (strided 1% sample, threshold, ``flatnonzero``,
  then an exact top-k among the candidates);
- one streaming read of the array, ``g.max()``: the physical limit.

With ``--baseline DIR`` (a directory holding another build's ``_core*.so``, e.g. a copy of
``python/moecore/_core*.so`` taken before a change) its sampled selection, without and with
error feedback, runs as two more contenders, so a before/after comparison is measured side
by side in one run.

``--cpu-levels avx2,baseline`` runs it once per moecore kernel level (``MOECORE_CPU_LEVEL``,
its own process each; ``topk_<level>.json``); by default the CPU's own level, and AVX2 after
it on an AVX-512 CPU.

It reports medians, GB/s over the gradient's bytes, and the ratio to the streaming read; the
encoded sizes against raw (u32 index + f32 value); and ``decompress_sum`` of 8 payloads
(ratio 0.01, n = 1e7) against one ``numpy.add`` over n. Correctness is checked first. Results
go to ``benches/results/topk.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from _common import add_cpu_levels_option, cpu_levels, rerun_per_level, results_path

from moecore import _core
from moecore.compress import TopK, decompress_sum

try:
    import torch
except ImportError:  # torch is optional: the table says it was skipped
    torch = None


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    infos = [
        f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, "
        f"{i.get('num_threads')} threads)"
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    return "; ".join(infos) or "no BLAS loaded"


def interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run round-robin `repeats` times after one warm-up."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for f in contenders.values():
        f()
    for _ in range(repeats):
        for name, f in contenders.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def load_baseline(directory: str):
    """Another build's ``_core`` extension module, loaded from ``directory``."""
    found = sorted(Path(directory).glob("_core*.so")) + sorted(Path(directory).glob("_core*.pyd"))
    if not found:
        raise SystemExit(f"--baseline: no _core*.so in {directory}")
    # The name's last part must stay `_core` (the init symbol is PyInit__core).
    spec = importlib.util.spec_from_file_location("moecore_baseline._core", found[0])
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: cannot load {found[0]}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numpy_sampled(g: np.ndarray, k: int) -> np.ndarray:
    """DGC's sampled threshold in numpy: the fair 'do it yourself' peer."""
    n = g.size
    stride = max(1, n // max(n // 100, 2 * n // k))
    sample = np.abs(g[::stride])
    ks = max(1, int(np.ceil(k * sample.size / n * 1.1)))
    t = np.partition(sample, sample.size - ks)[sample.size - ks]
    a = np.abs(g)
    cand = np.flatnonzero(a >= t)
    while cand.size < k:
        t *= 0.8
        cand = np.flatnonzero(a >= t)
    if cand.size > k:
        cand = cand[np.argpartition(a[cand], cand.size - k)[cand.size - k :]]
    return np.sort(cand)


def energy(g: np.ndarray, idx: np.ndarray) -> float:
    return float(np.sum(g[idx].astype(np.float64) ** 2))


def check_correctness(g: np.ndarray, k: int) -> dict[str, float]:
    """Exact equals argpartition's magnitudes; sampled keeps ≥ 99% of the energy; torch agrees."""
    a = np.abs(g)
    ref = np.sort(a[np.argpartition(a, a.size - k)[a.size - k :]])
    exact = _core.compress_select(g, k, method="exact")
    assert exact.size == k and np.array_equal(np.sort(a[exact]), ref), "exact != argpartition"
    sampled = _core.compress_select(g, k, method="sampled")
    e_exact = energy(g, exact)
    ratio = energy(g, sampled) / e_exact
    assert sampled.size == k and ratio >= 0.99, f"sampled energy {ratio:.4f}"
    npy = numpy_sampled(g, k)
    assert npy.size == k
    if torch is not None:
        _, ti = torch.topk(torch.from_numpy(g).abs(), k)
        assert np.array_equal(np.sort(a[ti.numpy()]), ref), "torch.topk != argpartition"
    # The payload decodes to the selected entries.
    p, ctx = TopK(k / g.size, method="exact", error_feedback=False).compress(g)
    dense = TopK().decompress(p, ctx)
    assert np.array_equal(np.flatnonzero(dense), exact)
    return {"sampled_energy_fraction": ratio}


def bench_selection(n: int, ratio: float, repeats: int, rng, baseline=None) -> dict:
    g = rng.standard_normal(n).astype(np.float32)
    k = TopK.k_for(n, ratio)
    checks = check_correctness(g, k)
    contenders = {}
    for method in ("exact", "sampled"):
        for ef in (False, True):
            c = TopK(ratio, method=method, error_feedback=ef)
            name = f"moecore {method}" + (" +EF" if ef else "")
            contenders[name] = lambda c=c: c.compress(g, name="g")
    if baseline is not None:
        # The same calls TopK makes (sampled, f32 values, auto index), with their own residual.
        residual = np.zeros(n, np.float32)
        contenders["baseline sampled"] = lambda: baseline.compress_topk(g, k, method="sampled")
        contenders["baseline sampled +EF"] = lambda: baseline.compress_topk(
            g, k, method="sampled", residual=residual
        )
    contenders["numpy argpartition"] = lambda: np.argpartition(np.abs(g), n - k)[n - k :]
    contenders["numpy sampled"] = lambda: numpy_sampled(g, k)
    if torch is not None:
        tg = torch.from_numpy(g)
        contenders["torch.topk"] = lambda: torch.topk(tg.abs(), k)
    contenders["g.max() (stream)"] = g.max
    med = interleaved(contenders, repeats)
    stream = med["g.max() (stream)"]
    rows = {
        name: {
            "median_ms": t * 1e3,
            "GB_per_s": n * 4 / t / 1e9,
            "x_stream": t / stream,
        }
        for name, t in med.items()
    }
    sizes = {}
    for values in ("f32", "f16"):
        p, _ = TopK(ratio, error_feedback=False, values=values).compress(g)
        sizes[values] = int(p.size)
    info = _core.compress_header(TopK(ratio, error_feedback=False).compress(g)[0])
    return {
        "n": n,
        "ratio": ratio,
        "k": k,
        "checks": checks,
        "rows": rows,
        "bytes": {
            "raw_u32_f32": 8 * k,
            "payload_f32": sizes["f32"],
            "payload_f16": sizes["f16"],
            "index_encoding": info["index"],
            "index_bytes": int(info["index_bytes"]),
            "index_vs_raw_u32": info["index_bytes"] / (4 * k),
        },
    }


def bench_decompress_sum(n: int, repeats: int, rng) -> dict:
    k = n // 100
    c = TopK(0.01, error_feedback=False, values="f16")
    payloads = [c.compress(rng.standard_normal(n).astype(np.float32))[0] for _ in range(8)]
    out = np.zeros(n, np.float32)
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    c_out = np.empty_like(a)
    # correctness: the sum equals numpy's sum of the dense payloads
    want = np.zeros(n, np.float64)
    for p in payloads:
        want += TopK().decompress(p).astype(np.float64)
    got = decompress_sum(payloads, np.zeros(n, np.float32), 1.0)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    med = interleaved(
        {
            "decompress_sum(8)": lambda: decompress_sum(payloads, out, 0.125),
            "np.add(a, b, out=c)": lambda: np.add(a, b, out=c_out),
            "np.add(a, b)": lambda: np.add(a, b),
        },
        repeats,
    )
    base = med["np.add(a, b, out=c)"]
    return {
        "n": n,
        "k_per_payload": k,
        "rows": {name: {"median_ms": t * 1e3, "x_np_add_out": t / base} for name, t in med.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-n", type=float, default=1e8, help="largest n (default 1e8)")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs at n = 1e6")
    ap.add_argument("--baseline", help="directory with another build's _core*.so to compare")
    add_cpu_levels_option(ap)
    args = ap.parse_args()
    if rerun_per_level(cpu_levels(args.cpu_levels)):
        return
    baseline = load_baseline(args.baseline) if args.baseline else None
    rng = np.random.default_rng(0)
    print(f"moecore top-k benchmark; numpy {np.__version__}; BLAS: {blas_info()}")
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"rayon threads {_core.build_info()['rayon_threads']}; moecore kernel level "
        f"{_core.build_info()['cpu_level']} ({_core.build_info()['cpu_level_source']})"
    )
    if torch is None:
        print("torch: not importable, torch.topk column skipped")
    else:
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    results = {"selection": [], "decompress_sum": None}
    for n in [int(x) for x in (1e6, 1e7, 1e8) if x <= args.max_n]:
        repeats = max(5, args.repeats * 1_000_000 // n) if n > 1_000_000 else args.repeats
        for ratio in (0.001, 0.01):
            r = bench_selection(n, ratio, repeats, rng, baseline)
            results["selection"].append(r)
            load = os.getloadavg()[0]
            print(
                f"\nn = {n:.0e}, ratio = {ratio} (k = {r['k']}), median of {repeats} "
                f"(1-min load average after: {load:.2f}):"
            )
            print(f"  {'':24} {'ms':>9} {'GB/s':>7} {'x stream':>9}")
            for name, row in r["rows"].items():
                print(
                    f"  {name:24} {row['median_ms']:9.2f} {row['GB_per_s']:7.2f} "
                    f"{row['x_stream']:9.2f}"
                )
            rows = r["rows"]
            speed = rows["numpy argpartition"]["median_ms"] / rows["moecore sampled"]["median_ms"]
            line = f"  sampled vs argpartition: {speed:.1f}x faster"
            if "torch.topk" in rows:
                vs_t = rows["torch.topk"]["median_ms"] / rows["moecore sampled"]["median_ms"]
                line += f"; vs torch.topk: {vs_t:.1f}x faster"
            print(line)
            b = r["bytes"]
            print(
                f"  bytes: raw u32+f32 {b['raw_u32_f32']}, payload f32 {b['payload_f32']} "
                f"({b['payload_f32'] / b['raw_u32_f32']:.0%}), f16 {b['payload_f16']} "
                f"({b['payload_f16'] / b['raw_u32_f32']:.0%}); {b['index_encoding']} indices "
                f"{b['index_vs_raw_u32']:.0%} of raw u32"
            )
    if args.max_n >= 1e7:
        d = bench_decompress_sum(10_000_000, max(5, args.repeats), rng)
        results["decompress_sum"] = d
        print("\ndecompress_sum of 8 payloads (ratio 0.01, f16) into n = 1e7:")
        for name, row in d["rows"].items():
            print(f"  {name:24} {row['median_ms']:9.2f} ms {row['x_np_add_out']:6.2f}x np.add(out)")
    results["env"] = {
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "blas": blas_info(),
        "rayon_threads": _core.build_info()["rayon_threads"],
        "cpu_level": _core.build_info()["cpu_level"],
    }
    out = results_path("topk")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
