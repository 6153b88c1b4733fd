"""One MoE layer (forward + backward) and one attention op: moecore against PyTorch eager.

MoE: 4096 tokens, d_model 256, 8 experts, top-2, expert hidden 512, GELU (tanh), Switch aux
loss 0.01. PyTorch versions written here: a per-expert loop (index_select / index_add_) and a
sort-gather-scatter "grouped" version. Attention: 4 heads, T = 256, batch 16, causal,
against ``torch.nn.functional.scaled_dot_product_attention``.

Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/moe_layer.py [--rounds=21]
(torch from PyPI, for the benchmark only; without it the torch columns are skipped).
The implementations run in turn, one call each per round, so that a slow phase of this noisy
machine hits all of them alike; each table gives the median time and the median of the
per-round ratios to moecore with a distribution-free 95 % interval.
``--keep-freed-memory`` first tunes glibc's malloc as ``moecore train`` does
(:func:`moecore.train.memory.keep_freed_memory`), for moecore and torch alike: without it
each iteration pays page faults for the ~100 MB of buffers it frees and allocates again.
"""

from __future__ import annotations

import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import blas_info, paired_times, table, try_torch, write_results

import moecore as mc
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


def main() -> None:
    rounds = 21
    for arg in sys.argv[1:]:
        if arg.startswith("--rounds="):
            rounds = int(arg.split("=", 1)[1])
    if "--keep-freed-memory" in sys.argv[1:]:
        from moecore.train.memory import keep_freed_memory

        print(f"keep_freed_memory: {keep_freed_memory()}")
    rng = np.random.default_rng(0)
    xa = rng.standard_normal((T, D)).astype(np.float32)
    ra = (rng.standard_normal((E, D)) / 16).astype(np.float32)
    w1a = (rng.standard_normal((E, D, H)) / 16).astype(np.float32)
    w2a = (rng.standard_normal((E, H, D)) / 22).astype(np.float32)
    dya = rng.standard_normal((T, D)).astype(np.float32)
    params = [mc.Tensor(a.copy(), requires_grad=True) for a in (xa, ra, w1a, w2a)]
    ours = moecore_layer(*params, dya)
    y_ours = ours().data.copy()
    grads_ours = [p.grad.copy() for p in params]
    result = {"blas": blas_info(), "moe": {}, "attention": {}}
    moe_fns = {"moecore ops.moe": ours}
    torch = try_torch()
    if torch is not None:
        torch.set_num_threads(2)
        tp = [torch.tensor(a.copy(), requires_grad=True) for a in (xa, ra, w1a, w2a)]
        loop, grouped = torch_layers(torch, *tp, torch.tensor(dya))
        for name, fn in (("torch per-expert loop", loop), ("torch sort-gather-scatter", grouped)):
            y = fn().detach().numpy()
            np.testing.assert_allclose(y, y_ours, rtol=2e-3, atol=2e-3)
            for g_ours, p in zip(grads_ours, tp):
                np.testing.assert_allclose(p.grad.numpy(), g_ours, rtol=2e-2, atol=2e-3)
            moe_fns[name] = fn
    floor_name = "floor: the 6 expert GEMMs alone (numpy)"
    moe_fns[floor_name] = gemm_floor(xa, ra, w1a, w2a, dya)
    result["moe"] = paired_times(moe_fns, rounds)
    print(f"BLAS: {result['blas']}")
    print(f"\nMoE layer fwd+bwd: T={T} d={D} E={E} k={K} hidden={H}; {rounds} paired rounds")
    print(report(result["moe"]))
    torch_ms = [t["median_s"] * 1e3 for n, t in result["moe"].items() if n.startswith("torch")]
    if torch_ms:
        floor_ms = result["moe"][floor_name]["median_s"] * 1e3
        print(
            f"1.5x the faster torch version is {min(torch_ms) / 1.5:.1f} ms; the six products "
            f"alone take {floor_ms:.1f} ms, leaving {min(torch_ms) / 1.5 - floor_ms:.1f} ms for "
            "routing, GELU, gathers, scatters and the aux loss"
        )

    # Attention as a model runs it: from the packed q/k/v projection [B, T, 3·D] to [B, T, D].
    qkv = rng.standard_normal((B, S, 3 * NH * HD)).astype(np.float32)
    g = rng.standard_normal((B, S, NH * HD)).astype(np.float32)
    qt = mc.Tensor(qkv.copy(), requires_grad=True)

    def ours_att():
        qt.grad = None
        out = ops.packed_attention(qt, NH)
        out.backward(g)
        return out

    out_ours = ours_att().data.copy()
    grad_ours = qt.grad.copy()
    att_fns = {"moecore ops.packed_attention": ours_att}
    if torch is not None:
        tq = torch.tensor(qkv.copy(), requires_grad=True)
        tg = torch.tensor(g)

        def torch_att():
            tq.grad = None
            q, k, v = tq.view(B, S, 3, NH, HD).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out = out.transpose(1, 2).reshape(B, S, NH * HD)
            out.backward(tg)
            return out

        np.testing.assert_allclose(torch_att().detach().numpy(), out_ours, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(tq.grad.numpy(), grad_ours, rtol=1e-2, atol=1e-3)
        att_fns["torch sdpa (causal, same packing)"] = torch_att
    result["attention"] = paired_times(att_fns, rounds)
    print(
        f"\nattention fwd+bwd: batch {B}, heads {NH}, T {S}, head dim {HD}; {rounds} paired rounds"
    )
    print(report(result["attention"]))
    print(f"\nwritten {write_results('moe_layer', result)}")


if __name__ == "__main__":
    main()
