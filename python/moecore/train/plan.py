"""``moecore plan``: predicted step time at 2 to 1024 workers from a profiled step.

One forward and backward of the run's model in this process give the compute (forward time,
and for each parameter the backward time until its gradient is ready, from the gradient
hooks); the costs of copying gradients into buckets, of top-k compression and of decoding
are timed on this machine; the link is given. Then
:func:`moecore.comm.simulate` replays the scheduler's decisions for each worker count and
each variant (dense fifo, dense priority, top-k) and bucket cap at the same per-rank batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from moecore.comm import CostModel, GradSpec, Scheduler, StepProfile, simulate
from moecore.compress import TopK

__all__ = ["compression_costs", "copy_cost", "plan", "profile_step"]


def profile_step(model: Any, x: Any, y: Any, optimizer: Any = None, repeat: int = 3) -> StepProfile:
    """Times ``model(x, y).backward()`` and, per parameter, when backward finished its
    gradient (``optimizer.step()`` too when given), after one warm-up run: of ``repeat``
    runs, the one whose step time is the median (a single run on a shared machine can be
    far off)."""
    params = [p for _, p in model.named_parameters()]
    marks: dict[int, float] = {}
    removers = [
        p.register_post_accumulate_grad_hook(
            lambda _t, i=i: marks.__setitem__(i, time.perf_counter())
        )
        for i, p in enumerate(params)
    ]
    runs = []
    try:
        for r in range(1 + max(1, repeat)):
            model.zero_grad()
            marks.clear()
            t0 = time.perf_counter()
            loss = model(x, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            t3 = t2
            if optimizer is not None:
                optimizer.step()
                t3 = time.perf_counter()
            if r > 0:  # the first run is the warm-up
                runs.append((t3 - t0, _profile(len(params), marks, t0, t1, t2, t3)))
    finally:
        for remove in removers:
            remove()
        model.zero_grad()
    runs.sort(key=lambda run: run[0])
    return runs[len(runs) // 2][1]


def _profile(
    n: int, marks: dict[int, float], t0: float, t1: float, t2: float, t3: float
) -> StepProfile:
    """One run's profile from its gradient-ready times."""
    order = sorted(marks, key=marks.__getitem__)
    order += [i for i in range(n) if i not in marks]  # never ready: at the end
    times, last = [], t1
    for i in order:
        at = marks.get(i, t2)
        times.append(max(0.0, at - last))
        last = max(last, at)
    times[-1] += max(0.0, t2 - last)
    return StepProfile(t1 - t0, tuple(order), tuple(times), t3 - t2)


def _median_seconds(work: Any, repeat: int) -> float:
    work()  # warm-up: first-touch page faults, allocations
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def compression_costs(ratio: float, n: int = 1 << 23, repeat: int = 5) -> tuple[float, float]:
    """Seconds per element of top-k compression with error feedback, and per entry of
    decoding the gathered payloads into a bucket, timed on this machine as
    :class:`moecore.distributed.DataParallel` does them. ``n`` (default 32 MiB of float32) should
    exceed the last-level cache, as a bucket does: timed in cache, both run several times
    faster than they do on real buckets."""
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    c = TopK(ratio, error_feedback=True)
    payload = c.compress(g, name="x")[0]
    per_elem = _median_seconds(lambda: c.compress(g, name="x"), repeat) / n
    out = np.empty(n, np.float32)
    decode = _median_seconds(lambda: c.decompress_sum([payload] * 4, out, overwrite=True), repeat)
    return per_elem, decode / (4 * TopK.k_for(n, ratio))


def copy_cost(nbytes: int = 1 << 25, repeat: int = 5) -> float:
    """Seconds per byte to copy gradients into an all-reduce's buffer (``dst[...] = src``,
    float32), timed on this machine on ``nbytes`` (default 32 MiB, beyond the last-level
    cache)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    return _median_seconds(lambda: np.copyto(dst, src), repeat) / nbytes


def plan(
    model: Any,
    profile: StepProfile,
    workers: list[int],
    cost: CostModel,
    ratio: float | None = 0.01,
    bucket_mb: float | Sequence[float] = 25,
) -> list[dict[str, Any]]:
    """One row per (workers, bucket cap, variant) with the predicted step, exposed
    communication and communication time in seconds.

    Several bucket caps (``bucket_mb=[25, 4]``) show which hides the most communication for
    this model: with caps as PyTorch's DDP sets them, a model whose gradients make only a
    few buckets sends most of its bytes after backward has moved past them."""
    if np.ndim(bucket_mb) == 0:
        caps = [float(cast(float, bucket_mb))]
    else:
        caps = [float(c) for c in cast(Sequence[float], bucket_mb)]
    if not caps or any(not c > 0 for c in caps):
        raise ValueError(f"bucket_mb: every bucket cap must be > 0 MiB, got {bucket_mb!r}")
    specs = []
    for i, (name, p) in enumerate(model.named_parameters()):
        specs.append(GradSpec(name, int(p.data.size), "float32", layer=i))
    variants: list[tuple[str, dict[str, Any]]] = [
        ("dense fifo", {"policy": "fifo"}),
        ("dense priority", {"policy": "priority"}),
    ]
    if ratio is not None:
        variants.append((f"top-k {ratio:g}", {"policy": "fifo", "compress_ratio": ratio}))
    rows = []
    for p in workers:
        for cap in caps:
            for name, kw in variants:
                s = Scheduler(specs, world=p, bucket_mb=cap, **kw)
                r = simulate(s, profile, cost)
                rows.append({"workers": p, "bucket_mb": cap, "variant": name, **r})
    return rows
