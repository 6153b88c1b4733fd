"""One MoE layer (forward + backward) and one attention op: moecore against PyTorch eager.

MoE: 4096 tokens, d_model 256, 8 experts, top-2, expert hidden 512, GELU (tanh), Switch aux
loss 0.01. PyTorch versions written here: a per-expert loop (index_select / index_add_) and a
sort-gather-scatter "grouped" version. Attention: 4 heads, T = 256, batch 16, causal,
against ``torch.nn.functional.scaled_dot_product_attention``.

Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/moe_layer.py [--rounds=21]
[--baseline=OTHER/python] (the last adds the moecore layers of another tree, imported from
OTHER/python with its extension built or copied there: a before/after in one run)
[--cpu-levels=avx512,avx2] (moecore's workers once per kernel level, side by side; by
default the CPU's own level, and avx2 beside it on an AVX-512 CPU)
[--torch-python=/work/venv-torch/bin/python] (torch from PyPI, for the benchmark only: the
interpreter of another venv runs the torch workers, "moecore beside torch" included, so torch
need not be installed beside moecore; without the option the torch workers use this
interpreter if it has torch, and without torch the torch columns are skipped).
Each implementation runs in a worker process of its own, so torch's OpenMP threads cannot
take the cores from moecore's inside one process; "moecore beside torch" is moecore's layer
in a process that runs torch's faster layer right before each timed call (what a user who
embeds moecore next to torch meets). The workers run in turn, one call each per round, so
that a slow phase of this noisy machine hits all of them alike; each table gives the median
time and the median of the per-round ratios to moecore with a distribution-free 95 %
interval. Every worker's outputs and gradients are checked against moecore's first.
``--keep-freed-memory`` first tunes glibc's malloc as ``moecore train`` does
(:func:`moecore.train.memory.keep_freed_memory`), for moecore and torch alike: without it
each iteration pays page faults for the ~100 MB of buffers it frees and allocates again.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (
    Worker,
    blas_info,
    cpu_levels,
    level_env,
    paired_stats,
    table,
    torch_python,
    write_results,
)

from moecore import ops

T, D, E, K, H = 4096, 256, 8, 2, 512
B, NH, S, HD = 16, 4, 256, 64


def moecore_layer(x, router, w1, w2, dy):
    def run():
        for p in (x, router, w1, w2):
            p.grad = None
        y = ops.moe(x, router, w1, w2, k=K, aux_loss=0.01)
        y.backward(dy)
        return y

    return run


def torch_layers(torch, x, router, w1, w2, dy):
    f = torch.nn.functional

    def route(xx):
        probs = torch.softmax(xx @ router.T, dim=-1)
        w, idx = torch.topk(probs, K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        frac = torch.bincount(idx.flatten(), minlength=E).to(xx.dtype) / (T * K)
        aux = 0.01 * E * (frac * probs.mean(0)).sum()
        return w, idx, aux

    def loop():
        for p in (x, router, w1, w2):
            p.grad = None
        w, idx, aux = route(x)
        y = torch.zeros_like(x)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = f.gelu(x.index_select(0, tok) @ w1[e], approximate="tanh") @ w2[e]
            y = y.index_add(0, tok, h * w[tok, slot].unsqueeze(1))
        ((y * dy).sum() + aux).backward()
        return y

    def grouped():
        for p in (x, router, w1, w2):
            p.grad = None
        w, idx, aux = route(x)
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        tok = order // K
        xs = x.index_select(0, tok)
        counts = torch.bincount(flat, minlength=E).tolist()
        outs = [
            f.gelu(chunk @ w1[e], approximate="tanh") @ w2[e]
            for e, chunk in enumerate(xs.split(counts))
            if chunk.shape[0] or True
        ]
        ys = torch.cat(outs) * w.flatten()[order].unsqueeze(1)
        y = torch.zeros_like(x).index_add(0, tok, ys)
        ((y * dy).sum() + aux).backward()
        return y

    return loop, grouped


def gemm_floor(x, router, w1, w2, dy):
    """The six expert products alone, per expert with numpy on the routed rows (forward
    ``x_e·w1[e]``, ``a·w2[e]``; backward ``dy·w2ᵀ``, ``aᵀ·dy``, ``x_eᵀ·dh``, ``dh·w1ᵀ``):
    12.9 GFLOP, the work no implementation of the layer can skip. GELU, routing, gathers and
    scatters are left out, so this is a floor, not a layer."""
    logits = x @ router.T
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    rows = [np.ascontiguousarray(x[np.nonzero(idx == e)[0]]) for e in range(E)]
    dys = [np.ascontiguousarray(dy[: len(r)]) for r in rows]

    def run():
        for e, (xe, dye) in enumerate(zip(rows, dys)):
            a = xe @ w1[e]
            a @ w2[e]
            dh = dye @ w2[e].T
            a.T @ dye
            xe.T @ dh
            dh @ w1[e].T

    return run


def report(timings: dict[str, dict[str, float]]) -> str:
    """The table of one benchmark: median time, and the median of the per-round ratios
    (time / moecore's, > 1: moecore is faster) with its 95 % interval."""
    rows = [
        [
            name,
            f"{t['median_s'] * 1e3:.1f}",
            f"{t['ratio']:.2f}",
            f"[{t['ratio_low']:.2f}, {t['ratio_high']:.2f}]",
        ]
        for name, t in timings.items()
    ]
    return table(rows, ["implementation", "median ms", "time / moecore", "95% interval"])


MOE_KINDS = [
    "moecore ops.moe",
    "moecore beside torch",
    "torch per-expert loop",
    "torch sort-gather-scatter",
    "floor: the 6 expert GEMMs alone (numpy)",
]
ATT_KINDS = ["moecore ops.packed_attention", "torch sdpa (causal, same packing)"]
#: Suffix of the kinds run from the ``--baseline`` tree (same code path, other moecore).
BASELINE = " (baseline tree)"


def moe_inputs() -> list[np.ndarray]:
    """x, router, w1, w2 and the output gradient, the same in every worker."""
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((T, D)).astype(np.float32),
        (rng.standard_normal((E, D)) / 16).astype(np.float32),
        (rng.standard_normal((E, D, H)) / 16).astype(np.float32),
        (rng.standard_normal((E, H, D)) / 22).astype(np.float32),
        rng.standard_normal((T, D)).astype(np.float32),
    ]


def att_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.standard_normal((B, S, 3 * NH * HD)).astype(np.float32),
        rng.standard_normal((B, S, NH * HD)).astype(np.float32),
    ]


def _numpy(t: Any) -> np.ndarray:
    return np.asarray(t.detach().numpy() if hasattr(t, "detach") else t.data)


def build(kind: str) -> tuple[Any, Any, Any]:
    """The timed function of one worker, one to call untimed before it (or None), and one
    returning its outputs then gradients."""
    if kind.startswith("floor"):
        *arrays, dy = moe_inputs()
        return gemm_floor(*arrays, dy), None, lambda: []
    torch = None
    if "torch" in kind:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    if kind in ATT_KINDS:
        qkv, g = att_inputs()
        if torch is None:
            import moecore as mc
            from moecore import ops

            q, attention = mc.Tensor(qkv, requires_grad=True), ops.packed_attention
        else:
            q, tg = torch.tensor(qkv, requires_grad=True), torch.tensor(g)

            def attention(t: Any, heads: int) -> Any:
                qq, k, v = t.view(B, S, 3, heads, HD).permute(2, 0, 3, 1, 4)
                out = torch.nn.functional.scaled_dot_product_attention(qq, k, v, is_causal=True)
                return out.transpose(1, 2).reshape(B, S, heads * HD)

        state: dict[str, Any] = {}

        def att() -> None:
            q.grad = None
            state["out"] = attention(q, NH)
            state["out"].backward(g if torch is None else tg)

        def att_outputs() -> list[np.ndarray]:
            att()
            return [_numpy(state["out"]), _numpy(q.grad)]

        return att, None, att_outputs
    *arrays, dy = moe_inputs()
    if kind.startswith("moecore"):
        import moecore as mc

        params = [mc.Tensor(a, requires_grad=True) for a in arrays]
        fn = moecore_layer(*params, dy)
        before = None
        if kind == "moecore beside torch":
            assert torch is not None
            tp = [torch.tensor(a, requires_grad=True) for a in arrays]
            before = torch_layers(torch, *tp, torch.tensor(dy))[1]  # torch's faster layer
        return fn, before, lambda: [_numpy(fn()), *(_numpy(p.grad) for p in params)]
    assert torch is not None
    tp = [torch.tensor(a, requires_grad=True) for a in arrays]
    loop, grouped = torch_layers(torch, *tp, torch.tensor(dy))
    fn = loop if "loop" in kind else grouped
    return fn, None, lambda: [_numpy(fn()), *(_numpy(p.grad) for p in tp)]


def worker(kind: str, out: str) -> None:
    """Serves one implementation: saves its outputs to ``out``, says ready, then times one
    call per ``run`` command (after the untimed ``before`` call, if the kind has one)."""
    kind = kind.removesuffix(BASELINE)  # the worker's PYTHONPATH chose the tree
    kind, _ = split_level(kind)  # and its MOECORE_CPU_LEVEL its kernels (`worker_env`)
    if "--keep-freed-memory" in sys.argv:
        from moecore.train.memory import keep_freed_memory

        keep_freed_memory()
    fn, before, outputs = build(kind)
    np.savez(out, *outputs())
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            return
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


def split_level(kind: str) -> tuple[str, str | None]:
    """``"<kind> [<level>]"`` (see :func:`with_levels`) as (kind, level); (kind, None)
    for a name without a level."""
    base, sep, rest = kind.partition(" [")
    return base, rest.removesuffix("]") if sep else None


def with_levels(kinds: list[str], levels: list[str]) -> list[str]:
    """``kinds`` with moecore's own kind once per kernel level after the first, named
    ``"<kind> [<level>]"``, right after it (the first level runs under the plain name)."""
    extra = [f"{kinds[0]} [{level}]" for level in levels[1:]]
    return [kinds[0], *extra, *kinds[1:]]


def worker_env(kind: str, baseline: str | None, levels: list[str] | None = None) -> dict[str, str]:
    """The environment of ``kind``'s worker: the baseline tree first on its path if it is one
    of the baseline kinds; moecore's kernels capped at the kind's level (``[level]`` in its
    name, else the first of ``levels``)."""
    env = dict(os.environ)
    if kind.startswith("moecore") and levels:
        env = level_env(env, split_level(kind)[1] or levels[0])
    if baseline and kind.endswith(BASELINE):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [baseline, env.get("PYTHONPATH")]))
    return env


def run_workers(
    kinds: list[str],
    rounds: int,
    flags: list[str],
    warmup: int = 2,
    baseline: str | None = None,
    torch_py: str | None = None,
    levels: list[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Starts one worker per kind (the kinds with torch under ``torch_py``), checks every
    worker's outputs against the first's, and times ``rounds`` calls each, in turn, the order
    rotating from round to round."""
    with tempfile.TemporaryDirectory() as tmp:
        workers = [
            Worker(
                __file__,
                k,
                ["--out", str(Path(tmp) / f"{i}.npz"), *flags],
                worker_env(k, baseline, levels),
                python=torch_py if "torch" in k else None,
            )
            for i, k in enumerate(kinds)
        ]
        ref = np.load(Path(tmp) / "0.npz")
        for i in range(1, len(workers)):
            got = np.load(Path(tmp) / f"{i}.npz")
            for j, name in enumerate(got.files):
                rtol, atol = (2e-3, 2e-3) if j == 0 else (2e-2, 2e-3)
                np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol)
        samples: dict[str, list[float]] = {w.kind: [] for w in workers}
        for r in range(-warmup, rounds):
            shift = r % len(workers)
            for w in workers[shift:] + workers[:shift]:
                seconds = w.ask("run")["seconds"]
                if r >= 0:
                    samples[w.kind].append(seconds)
        for w in workers:
            w.close()
    return paired_stats(samples)


def main() -> None:
    if "--worker" in sys.argv:
        at = sys.argv.index
        worker(sys.argv[at("--worker") + 1], sys.argv[at("--out") + 1])
        return
    rounds = 21
    for arg in sys.argv[1:]:
        if arg.startswith("--rounds="):
            rounds = int(arg.split("=", 1)[1])
    flags = [a for a in sys.argv[1:] if a == "--keep-freed-memory"]
    baseline = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--baseline=")), None)
    torch_py = torch_python(
        next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--torch-python=")), None)
    )
    have_torch = torch_py is not None
    levels = cpu_levels(
        next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--cpu-levels=")), None)
    )
    moe_kinds = with_levels([k for k in MOE_KINDS if have_torch or "torch" not in k], levels)
    att_kinds = with_levels([k for k in ATT_KINDS if have_torch or "torch" not in k], levels)
    if baseline:
        moe_kinds.insert(1, MOE_KINDS[0] + BASELINE)
        att_kinds.insert(1, ATT_KINDS[0] + BASELINE)
    result: dict[str, Any] = {"blas": blas_info(), "load_average": os.getloadavg()[0]}
    if baseline:
        result["baseline"] = baseline
    if torch_py:
        result["torch_python"] = torch_py
    result["cpu_levels"] = levels
    result["moe"] = run_workers(
        moe_kinds, rounds, flags, baseline=baseline, torch_py=torch_py, levels=levels
    )
    print(f"BLAS: {result['blas']}; load average {result['load_average']:.2f}")
    print(f"moecore kernel levels: {', '.join(levels)} (the first under the plain name)")
    print(f"\nMoE layer fwd+bwd: T={T} d={D} E={E} k={K} hidden={H}; {rounds} paired rounds")
    print(report(result["moe"]))
    torch_ms = [t["median_s"] * 1e3 for n, t in result["moe"].items() if n.startswith("torch")]
    if torch_ms:
        floor_ms = result["moe"][MOE_KINDS[-1]]["median_s"] * 1e3
        print(
            f"1.25x the faster torch version is {min(torch_ms) / 1.25:.1f} ms; the six products "
            f"alone take {floor_ms:.1f} ms, leaving {min(torch_ms) / 1.25 - floor_ms:.1f} ms for "
            "routing, GELU, gathers, scatters and the aux loss"
        )
    result["attention"] = run_workers(
        att_kinds, rounds, flags, baseline=baseline, torch_py=torch_py, levels=levels
    )
    print(
        f"\nattention fwd+bwd: batch {B}, heads {NH}, T {S}, head dim {HD}; {rounds} paired rounds"
    )
    print(report(result["attention"]))
    print(f"\nwritten {write_results('moe_layer', result)}")


if __name__ == "__main__":
    main()
