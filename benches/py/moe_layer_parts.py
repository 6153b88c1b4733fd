"""Where the time of one MoE layer goes: wall and CPU time (``time.process_time``) of each
kernel of ``ops.moe``'s forward and backward at the ``moe_layer.py`` shape, and of the whole
op through autograd. CPU time is the robust figure on a shared machine; compare thread counts
with ``OPENBLAS_NUM_THREADS`` / ``RAYON_NUM_THREADS``. ``--unfused`` times the expert FFN as
separate grouped matmuls and GELU passes (the path before the fused kernel) instead.

Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/moe_layer_parts.py
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import moecore as mc
from moecore import moe_kernels as mk
from moecore import ops
from moecore.ops.moe import _activate, _activate_backward, _aux_terms

T, D, E, K, H = 4096, 256, 8, 2, 512
REPEAT = 7


def main() -> None:
    unfused = "--unfused" in sys.argv[1:]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D)).astype(np.float32)
    router = (rng.standard_normal((E, D)) / 16).astype(np.float32)
    w1 = (rng.standard_normal((E, D, H)) / 16).astype(np.float32)
    w2 = (rng.standard_normal((E, H, D)) / 22).astype(np.float32)
    dy = rng.standard_normal((T, D)).astype(np.float32)
    times: dict[str, list[tuple[float, float]]] = {}

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        times.setdefault(name, []).append((time.perf_counter() - w0, time.process_time() - c0))
        return out

    def ffn(xs: Any, counts: Any) -> tuple[Any, Any, Any, Any]:
        if not unfused:
            return (*timed("gelu_ffn", mk.gelu_ffn, xs, counts, w1, w2), None)
        h = timed("grouped_matmul 1", mk.grouped_matmul, xs, counts, w1)
        a, saved = timed("gelu", _activate, h, "gelu")
        return h, a, timed("grouped_matmul 2", mk.grouped_matmul, a, counts, w2), saved

    def ffn_backward(xs: Any, counts: Any, h: Any, a: Any, saved: Any, d_ys: Any) -> Any:
        if not unfused:
            return timed("gelu_ffn_backward", mk.gelu_ffn_backward, xs, counts, w1, w2, h, a, d_ys)
        d_a = timed("grouped_matmul_dx 2", mk.grouped_matmul_dx, d_ys, counts, w2)
        timed("grouped_matmul_dw 2", mk.grouped_matmul_dw, a, d_ys, counts)
        d_h = timed("gelu backward", _activate_backward, d_a, h, saved, "gelu")
        d_xs = timed("grouped_matmul_dx 1", mk.grouped_matmul_dx, d_h, counts, w1)
        timed("grouped_matmul_dw 1", mk.grouped_matmul_dw, xs, d_h, counts)
        return d_xs, None, None

    def kernels() -> None:
        logits = timed("router_logits", mk.router_logits, x, router)
        idx, weights, probs = timed("route", mk.route, logits, K)
        xs, order, counts = timed("permute", mk.permute, x, idx, E)
        h, a, ys, saved = ffn(xs, counts)
        timed("unpermute", mk.unpermute, ys, order, weights)
        timed("aux loss", _aux_terms, logits, probs, idx, "softmax", 0.01, 0.0)
        d_ys, d_w = timed("unpermute_backward", mk.unpermute_backward, dy, ys, order, weights)
        d_xs = ffn_backward(xs, counts, h, a, saved, d_ys)[0]
        d_x = timed("permute_backward", mk.permute_backward, d_xs, order, T, K)
        d_logits = timed("route_backward", mk.route_backward, d_w, idx, probs)
        timed("router_backward", mk.router_backward, d_logits, x, router, d_x)

    params = [mc.Tensor(a.copy(), requires_grad=True) for a in (x, router, w1, w2)]

    def whole_op() -> None:
        for p in params:
            p.grad = None
        ops.moe(*params, k=K, aux_loss=0.01).backward(dy)

    for _ in range(2):
        kernels()
        whole_op()
    times.clear()
    for _ in range(REPEAT):
        kernels()
        timed("ops.moe forward + backward (autograd)", whole_op)
    print(f"MoE layer T={T} d={D} E={E} k={K} hidden={H}, median of {REPEAT}")
    print(f"{'part':40s} {'wall ms':>8s} {'cpu ms':>8s}")
    total = [0.0, 0.0]
    for name, v in times.items():
        wall, cpu = (statistics.median(x[i] for x in v) * 1e3 for i in (0, 1))
        if not name.startswith("ops.moe"):
            total[0] += wall
            total[1] += cpu
        else:
            print(f"{'sum of the kernels':40s} {total[0]:8.1f} {total[1]:8.1f}")
        print(f"{name:40s} {wall:8.1f} {cpu:8.1f}")
    with open("/proc/loadavg") as f:
        print(f"load average: {f.read().strip()}")


if __name__ == "__main__":
    main()
