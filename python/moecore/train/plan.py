"""``moecore plan``: predicted step time at 2 to 1024 workers from a profiled step.

One forward and backward of the run's model in this process give the compute (forward time,
and for each parameter the backward time until its gradient is ready, from the gradient
hooks); the top-k compression cost is timed on this machine; the link is given. Then
:func:`moecore.comm.simulate` replays the scheduler's decisions for each worker count and
each variant (dense fifo, dense priority, top-k) at the same per-rank batch.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moecore.comm import CostModel, GradSpec, Scheduler, StepProfile, simulate
from moecore.compress import TopK

__all__ = ["compression_costs", "plan", "profile_step"]


def profile_step(model: Any, x: Any, y: Any, optimizer: Any = None, repeat: int = 2) -> StepProfile:
    """Times ``model(x, y).backward()`` (the last of ``repeat`` runs) and, per parameter, when
    backward finished its gradient; ``optimizer.step()`` too when given."""
    params = [p for _, p in model.named_parameters()]
    marks: dict[int, float] = {}
    removers = [
        p.register_post_accumulate_grad_hook(
            lambda _t, i=i: marks.__setitem__(i, time.perf_counter())
        )
        for i, p in enumerate(params)
    ]
    try:
        for _ in range(repeat):
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
    finally:
        for remove in removers:
            remove()
        model.zero_grad()
    order = sorted(marks, key=marks.__getitem__)
    order += [i for i in range(len(params)) if i not in marks]  # never ready: at the end
    times, last = [], t1
    for i in order:
        at = marks.get(i, t2)
        times.append(max(0.0, at - last))
        last = max(last, at)
    times[-1] += max(0.0, t2 - last)
    return StepProfile(t1 - t0, tuple(order), tuple(times), t3 - t2)


def compression_costs(ratio: float, n: int = 1 << 20) -> tuple[float, float]:
    """Seconds per element of top-k compression (with error feedback) and per entry of
    decode-and-sum, timed on this machine."""
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    c = TopK(ratio)
    c.compress(g, name="x")
    t0 = time.perf_counter()
    payload, _ = c.compress(g, name="x")
    t1 = time.perf_counter()
    out = np.zeros(n, np.float32)
    c.decompress_sum([payload] * 4, out=out)
    t2 = time.perf_counter()
    k = TopK.k_for(n, ratio)
    return (t1 - t0) / n, (t2 - t1) / (4 * k)


def plan(
    model: Any,
    profile: StepProfile,
    workers: list[int],
    cost: CostModel,
    ratio: float | None = 0.01,
    bucket_mb: float = 25,
) -> list[dict[str, Any]]:
    """One row per (workers, variant) with the predicted step, exposed communication and
    communication time in seconds."""
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
        for name, kw in variants:
            s = Scheduler(specs, world=p, bucket_mb=bucket_mb, **kw)
            r = simulate(s, profile, cost)
            rows.append({"workers": p, "variant": name, **r})
    return rows
