"""MoE kernels vs numpy (and PyTorch when importable), side by side in one run.

Shapes of the issue: T = 4096 tokens, d = 256, E = 8 experts, k = 2, expert hidden 512.
Each operation is first checked against its peers, then timed round-robin (one call of each
implementation per round, so machine noise hits all alike); the table shows medians and the
ratio peer / moecore (> 1 means moecore is faster). Results also go to
benches/results/moe_kernels.json.

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/moe_kernels.py [--numpy-first]
(add PYTHONPATH=<dir with torch> to include PyTorch; it is skipped when not importable).
``--threads T`` runs every implementation on T threads (``--threads 1``: core for core).
``--cpu-levels avx2,baseline`` runs the whole benchmark once per moecore kernel level (its
own process each, under ``MOECORE_CPU_LEVEL``; results in ``moe_kernels_<level>.json``); by
default the CPU's own level, and the AVX2 path after it on an AVX-512 CPU.
"""

# ruff: noqa: I001
from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable

import sys

# moecore first, as its users' programs do: importing it before numpy lets it set
# OPENBLAS_THREAD_TIMEOUT (see README, "process-wide settings"), so numpy's idle OpenBLAS
# threads sleep at once instead of spinning ~0.1 s on the cores the next moecore kernel needs.
# `--numpy-first` measures the other order. (Import sorting is off in this file for this.)
if "--numpy-first" in sys.argv:
    import numpy as np
import moecore  # noqa: F401  (imported for its side effect on OpenBLAS; see above)
import numpy as np
from threadpoolctl import threadpool_info

from moecore import build_info
from moecore import moe_kernels as mk
from _common import (
    add_cpu_levels_option,
    add_threads_option,
    cpu_levels,
    interleaved_samples,
    rerun_per_level,
    results_path,
    run_on_threads,
)

T, D, E, K, H = 4096, 256, 8, 2, 512

try:
    import torch
    import torch.nn.functional as tfun

    torch.set_num_threads(os.cpu_count() or 1)
except ImportError:
    torch = None


# --------------------------------------------------------------------------------------------
# numpy peers: what a user would write without moecore


def np_route(logits, k):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k].astype(np.int32)
    w = np.take_along_axis(probs, idx, axis=1)
    return idx, w / w.sum(axis=1, keepdims=True), probs


def np_permute(x, idx, n_experts):
    flat = idx.ravel()
    order = np.argsort(flat, kind="stable").astype(np.int32)
    return x[order // idx.shape[1]], order, np.bincount(flat, minlength=n_experts)


def np_unpermute_add_at(ys, order, w):
    y = np.zeros((w.shape[0], ys.shape[1]), dtype=ys.dtype)
    np.add.at(y, order // w.shape[1], ys * w.ravel()[order][:, None])
    return y


def np_unpermute_gather(ys, order, w):
    """The better numpy: invert the permutation and gather (dropless, no padding only)."""
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order), dtype=order.dtype)
    t, k = w.shape
    return np.einsum("tkd,tk->td", ys[inv].reshape(t, k, -1), w)


def np_permute_backward(dxs, order, t, k):
    dx = np.zeros((t, dxs.shape[1]), dtype=dxs.dtype)
    np.add.at(dx, order // k, dxs)
    return dx


def np_unpermute_backward(dy, ys, order, w):
    k = w.shape[1]
    dy_rows = dy[order // k]
    d_ys = dy_rows * w.ravel()[order][:, None]
    d_w = np.zeros(w.size, dtype=w.dtype)
    d_w[order] = np.einsum("rd,rd->r", dy_rows, ys)
    return d_ys, d_w.reshape(w.shape)


def blocks(counts):
    ends = np.cumsum(counts)
    return [slice(int(e - c), int(e)) for c, e in zip(counts, ends, strict=True)]


def np_per_expert(x, counts, w):
    """The sum of the per-expert dense matmuls (no concatenation): the target's yardstick."""
    return [x[s] @ w[e] for e, s in enumerate(blocks(counts))]


def np_per_expert_dx(dy, counts, w):
    return [dy[s] @ w[e].T for e, s in enumerate(blocks(counts))]


def np_per_expert_dw(x, dy, counts):
    return [x[s].T @ dy[s] for s in blocks(counts)]


# --------------------------------------------------------------------------------------------
# PyTorch peers


def torch_peers(x, logits, idx, w_route, order, counts, w1, dy_tok, h, dh):
    """The same operations in PyTorch (CPU), on tensors sharing the numpy arrays' memory."""
    tx, tl, tidx = torch.from_numpy(x), torch.from_numpy(logits), torch.from_numpy(idx)
    tw, torder = torch.from_numpy(w_route), torch.from_numpy(order).long()
    tw1, tdy = torch.from_numpy(w1), torch.from_numpy(dy_tok)
    th, tdh = torch.from_numpy(h), torch.from_numpy(dh)
    offs = torch.from_numpy(np.cumsum(counts).astype(np.int32))
    tys = th[:, :D].contiguous()
    tok = torder // K
    flat_w = tw.reshape(-1)

    def route():
        probs = torch.softmax(tl, dim=1)
        wv, ix = torch.topk(probs, K, dim=1)
        return ix, wv / wv.sum(dim=1, keepdim=True), probs

    def permute():
        flat = tidx.reshape(-1)
        o = torch.argsort(flat, stable=True)
        return tx.index_select(0, o // K), o, torch.bincount(flat, minlength=E)

    def unpermute():
        y = torch.zeros(T, D)
        return y.index_add_(0, tok, tys * flat_w[torder].unsqueeze(1))

    def permute_backward():
        return torch.zeros(T, D).index_add_(0, tok, tys)

    def unpermute_backward():
        rows = tdy.index_select(0, tok)
        d_w = torch.zeros(T * K)
        d_w[torder] = (rows * tys).sum(dim=1)
        return rows * flat_w[torder].unsqueeze(1), d_w.reshape(T, K)

    xs = tx.index_select(0, tok).contiguous()

    def gmm():
        return tfun.grouped_mm(xs, tw1, offs=offs)

    def gmm_dx():
        return tfun.grouped_mm(tdh, tw1.transpose(1, 2), offs=offs)

    def gmm_dw():
        return tfun.grouped_mm(xs.t(), tdh, offs=offs)

    return {
        "route": route,
        "permute": permute,
        "unpermute": unpermute,
        "permute_backward": permute_backward,
        "unpermute_backward": unpermute_backward,
        "grouped_matmul": gmm,
        "grouped_matmul_dx": gmm_dx,
        "grouped_matmul_dw": gmm_dw,
    }


# --------------------------------------------------------------------------------------------


def as_np(v):
    if torch is not None and isinstance(v, torch.Tensor):
        return v.numpy()
    return v


def check(name: str, got, want, rtol=1e-4, atol=1e-4) -> None:
    got, want = as_np(got), as_np(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def time_round_robin(
    fns: dict[str, Callable[[], object]], rounds: int
) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function, calls interleaved round by round."""
    samples = interleaved_samples(fns, rounds, warmup=2)
    return {n: (float(np.median(s)), float(np.min(s))) for n, s in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--numpy-first",
        action="store_true",
        help="import numpy before moecore (OpenBLAS's idle threads then spin after each call)",
    )
    add_threads_option(parser)
    add_cpu_levels_option(parser)
    args = parser.parse_args()
    if rerun_per_level(cpu_levels(args.cpu_levels)):
        return 0
    run_on_threads(args.threads, torch)

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    w1 = (rng.standard_normal((E, D, H)) / np.sqrt(D)).astype(np.float32)
    dy_tok = rng.standard_normal((T, D)).astype(np.float32)

    # --- correctness first -------------------------------------------------------------------
    idx, w_route, probs = mk.route(logits, K)
    n_idx, n_w, n_probs = np_route(logits, K)
    np.testing.assert_array_equal(idx, n_idx)
    check("route.weights", w_route, n_w, 1e-5, 1e-6)
    check("route.probs", probs, n_probs, 1e-5, 1e-7)
    xs, order, counts = mk.permute(x, idx, E)
    n_xs, n_order, n_counts = np_permute(x, idx, E)
    np.testing.assert_array_equal(order, n_order)
    np.testing.assert_array_equal(counts, n_counts)
    np.testing.assert_array_equal(xs, n_xs)
    h = mk.grouped_matmul(xs, counts, w1)
    check("grouped_matmul", h, np.concatenate(np_per_expert(xs, counts, w1)))
    dh = np.random.default_rng(1).standard_normal(h.shape).astype(np.float32)
    check(
        "grouped_matmul_dx",
        mk.grouped_matmul_dx(dh, counts, w1),
        np.concatenate(np_per_expert_dx(dh, counts, w1)),
    )
    check(
        "grouped_matmul_dw",
        mk.grouped_matmul_dw(xs, dh, counts),
        np.stack(np_per_expert_dw(xs, dh, counts)),
        1e-4,
        1e-3,
    )
    ys = np.ascontiguousarray(h[:, :D])
    y = mk.unpermute(ys, order, w_route)
    check("unpermute", y, np_unpermute_add_at(ys, order, w_route), 1e-5, 1e-5)
    check("unpermute(gather)", y, np_unpermute_gather(ys, order, w_route), 1e-5, 1e-5)
    check(
        "permute_backward",
        mk.permute_backward(ys, order, T, K),
        np_permute_backward(ys, order, T, K),
    )
    d_ys, d_w = mk.unpermute_backward(dy_tok, ys, order, w_route)
    n_dys, n_dw = np_unpermute_backward(dy_tok, ys, order, w_route)
    check("unpermute_backward.d_y_sorted", d_ys, n_dys, 1e-6, 1e-6)
    check("unpermute_backward.d_weights", d_w, n_dw, 1e-4, 1e-4)

    peers_t = None
    if torch is not None:
        peers_t = torch_peers(x, logits, idx, w_route, order, counts, w1, dy_tok, h, dh)
        t_idx, t_w, _ = peers_t["route"]()
        np.testing.assert_array_equal(t_idx.numpy(), idx)
        check("torch.route", t_w, w_route, 1e-5, 1e-6)
        t_xs, _, _ = peers_t["permute"]()
        np.testing.assert_array_equal(t_xs.numpy(), xs)
        check("torch.unpermute", peers_t["unpermute"](), y, 1e-5, 1e-5)
        check(
            "torch.permute_backward",
            peers_t["permute_backward"](),
            mk.permute_backward(ys, order, T, K),
        )
        t_dys, t_dw = peers_t["unpermute_backward"]()
        check("torch.unpermute_backward", t_dys, d_ys, 1e-6, 1e-6)
        check("torch.unpermute_backward.d_w", t_dw, d_w, 1e-4, 1e-4)
        check("torch.grouped_mm", peers_t["grouped_matmul"](), h)
        check(
            "torch.grouped_mm dx",
            peers_t["grouped_matmul_dx"](),
            mk.grouped_matmul_dx(dh, counts, w1),
        )
        check(
            "torch.grouped_mm dw",
            peers_t["grouped_matmul_dw"](),
            mk.grouped_matmul_dw(xs, dh, counts),
            1e-4,
            1e-3,
        )

    # --- timing ------------------------------------------------------------------------------
    warm_out = np.empty_like(xs)
    ops: dict[str, dict[str, Callable[[], object]]] = {
        "route": {
            "moecore": lambda: mk.route(logits, K),
            "numpy": lambda: np_route(logits, K),
        },
        "permute": {
            "moecore": lambda: mk.permute(x, idx, E),
            "numpy": lambda: np_permute(x, idx, E),
            # What any permute must do at least: write its [R, d] output once (fresh, as
            # both implementations return it, or into memory that is already mapped).
            "floor: write fresh output": lambda: np.empty_like(xs).fill(1.0),
            "floor: write warm output": lambda: warm_out.fill(1.0),
        },
        "unpermute": {
            "moecore": lambda: mk.unpermute(ys, order, w_route),
            "numpy": lambda: np_unpermute_add_at(ys, order, w_route),
            "numpy (inverse gather)": lambda: np_unpermute_gather(ys, order, w_route),
        },
        "permute_backward": {
            "moecore": lambda: mk.permute_backward(ys, order, T, K),
            "numpy": lambda: np_permute_backward(ys, order, T, K),
        },
        "unpermute_backward": {
            "moecore": lambda: mk.unpermute_backward(dy_tok, ys, order, w_route),
            "numpy": lambda: np_unpermute_backward(dy_tok, ys, order, w_route),
        },
        "grouped_matmul": {
            "moecore": lambda: mk.grouped_matmul(xs, counts, w1),
            "numpy": lambda: np_per_expert(xs, counts, w1),
        },
        "grouped_matmul_dx": {
            "moecore": lambda: mk.grouped_matmul_dx(dh, counts, w1),
            "numpy": lambda: np_per_expert_dx(dh, counts, w1),
        },
        "grouped_matmul_dw": {
            "moecore": lambda: mk.grouped_matmul_dw(xs, dh, counts),
            "numpy": lambda: np_per_expert_dw(xs, dh, counts),
        },
    }
    if peers_t is not None:
        for op, fn in peers_t.items():
            ops[op]["torch"] = fn

    blas = [
        {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    info = build_info()
    print(
        f"moecore {info['version']} ({info['profile']}, {info['rayon_threads']} threads), "
        f"numpy {np.__version__}"
    )
    print(f"BLAS: {blas}; moecore kernel level {info['cpu_level']} ({info['cpu_level_source']})")
    print(f"torch: {torch.__version__ if torch is not None else 'not importable (skipped)'}")
    print(
        f"shapes: T={T} d={D} E={E} k={K} hidden={H}, "
        f"rows R={xs.shape[0]}, counts={counts.tolist()}"
    )
    print(f"load average before timing: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{args.rounds} rounds; ratio = peer time / moecore time (> 1: moecore faster)\n")
    header = (
        f"{'operation':<20} {'implementation':<24} {'median ms':>10} {'ratio':>7}"
        f" {'min ms':>9} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    results = []
    flops = 2.0 * xs.shape[0] * D * H
    for op, fns in ops.items():
        timing = time_round_robin(fns, args.rounds)
        base_med, base_min = timing["moecore"]
        for impl, (sec, best) in timing.items():
            ratio, ratio_min = sec / base_med, best / base_min
            extra = f"  {flops / sec / 1e9:6.1f} GFLOP/s" if op.startswith("grouped") else ""
            print(
                f"{op:<20} {impl:<24} {sec * 1e3:>10.3f} {ratio:>7.2f}"
                f" {best * 1e3:>9.3f} {ratio_min:>7.2f}{extra}"
            )
            results.append(
                {
                    "op": op,
                    "impl": impl,
                    "median_s": sec,
                    "min_s": best,
                    "peer_over_moecore": ratio,
                    "peer_over_moecore_min": ratio_min,
                }
            )
        if op == "permute":
            floor = min(
                timing["floor: write fresh output"][0], timing["floor: write warm output"][0]
            )
            print(
                f"{'':<20} 3x numpy's permute would be {timing['numpy'][0] / 3 * 1e3:.3f} ms; "
                f"writing the output alone takes {floor * 1e3:.3f} ms"
            )
        print()

    out = results_path("moe_kernels")
    out.write_text(
        json.dumps(
            {
                "shapes": {"T": T, "d": D, "E": E, "k": K, "hidden": H},
                "rounds": args.rounds,
                "blas": blas,
                "numpy": np.__version__,
                "torch": torch.__version__ if torch is not None else None,
                "machine": platform.processor() or platform.machine(),
                "load_average": os.getloadavg()[0],
                "cpu_level": info["cpu_level"],
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
