"""moecore embedded in PyTorch: a small torch transformer with moecore's MoE against the same
model with a torch MoE, the MoE layer inside a torch training step with torch's OpenMP workers
spinning or sleeping, and DDP with and without moecore's top-k hook.

Run (torch installed beside moecore)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/embed.py [--rounds=9]
        [--shaped]   # root: also DDP over a loopback shaped to 1 Gbit/s (benches/py/dist.py's)

**Model.** Embedding → 2 × (LayerNorm, causal attention with ``scaled_dot_product_attention``,
LayerNorm, MoE FFN: 8 experts, top-2, GELU, Switch aux loss 0.01) → LM head; d_model 256,
hidden 512, batch 8 × 256 tokens, AdamW. Variants, each in a worker process of its own:
``moecore`` (``moecore.integrations.torch.MoE``, imported before torch so torch's OpenMP
workers sleep at once, ``OMP_WAIT_POLICY=PASSIVE``), ``moecore-spin`` (the same with
``MOECORE_OMP_PASSIVE=0``: libgomp's default spinning, the state before issue 32), ``torch``
(a torch MoE written here with torch ops: sort the assignments by expert, one matmul pair per
expert, ``index_add_`` back; torch's default OpenMP) and ``torch-passive`` (the same with
``OMP_WAIT_POLICY=PASSIVE``: what the setting costs torch). Tokens/s of a whole training step.

**Layer in a step.** In each worker, the MoE layer alone (forward + backward, 4096 tokens,
d_model 256, 8 experts, top-2, hidden 512: benches/py/moe_layer.py's size) timed right after
the torch part of a training step (the attention blocks' forward and backward): what the
layer costs inside a torch training loop.

The workers run in turn, one call each per round, the order rotating (``_common``), so a slow
phase of this shared machine hits them alike; medians and the per-round ratio to ``moecore``
with a 95 % interval.

**DDP** (``--shaped``, root): 2 gloo ranks (one thread each) in a network namespace whose
loopback is shaped to 1 Gbit/s, the same model with moecore's MoE, plain DDP against
``topk_hook`` (``TopK(0.01)``, after one dense step): median step time and the bytes each
rank sent per step. Results go to ``benches/results/embed.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Worker, paired_stats, table, write_results

VOCAB, D, HIDDEN, E, K, HEADS = 512, 256, 512, 8, 2, 4
BATCH, SEQ = 8, 256
LAYER_T = 4096
VARIANTS = {
    "moecore": {"MOECORE_OMP_PASSIVE": "1"},
    "moecore-spin": {"MOECORE_OMP_PASSIVE": "0"},
    "torch": {},
    "torch-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --- the models (built inside the workers) --------------------------------------------------


def torch_moe_class(torch):
    """A routed MoE written with torch ops (what a torch user writes without a library)."""
    f = torch.nn.functional

    class TorchMoE(torch.nn.Module):
        def __init__(self, d, hidden, n_experts, k, aux_loss=0.01):
            super().__init__()
            self.k, self.aux = k, aux_loss
            self.router = torch.nn.Parameter(torch.randn(n_experts, d) * 0.02)
            self.w1 = torch.nn.Parameter(torch.randn(n_experts, d, hidden) * 0.02)
            self.w2 = torch.nn.Parameter(torch.randn(n_experts, hidden, d) * 0.02)

        def forward(self, x):
            lead = x.shape[:-1]
            t = x.reshape(-1, x.shape[-1])
            logits = t @ self.router.T
            probs = torch.softmax(logits, -1)
            top_p, top_i = probs.topk(self.k, dim=-1)
            weights = top_p / top_p.sum(-1, keepdim=True)
            flat = top_i.reshape(-1)
            order = torch.argsort(flat, stable=True)
            tokens = order // self.k
            counts = torch.bincount(flat, minlength=self.router.shape[0]).tolist()
            xs = t[tokens]
            outs, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    h = f.gelu(xs[start : start + n] @ self.w1[e], approximate="tanh")
                    outs.append(h @ self.w2[e])
                start += n
            ys = torch.cat(outs) * weights.reshape(-1)[order].unsqueeze(1)
            y = torch.zeros_like(t).index_add_(0, tokens, ys)
            if self.training and self.aux:
                frac = torch.bincount(flat, minlength=probs.shape[1]).to(t.dtype) / flat.numel()
                self.aux_loss = self.aux * probs.shape[1] * (frac * probs.mean(0)).sum()
            return y.reshape(*lead, -1)

    return TorchMoE


def build_model(torch, kind: str):
    """The transformer with the ``kind`` MoE (``"moecore"`` or ``"torch"``)."""
    if kind == "moecore":
        from moecore.integrations.torch import MoE

        def make_moe():
            return MoE(D, HIDDEN, E, K, aux_loss=0.01)
    else:
        torch_moe = torch_moe_class(torch)

        def make_moe():
            return torch_moe(D, HIDDEN, E, K)

    f = torch.nn.functional

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
            self.qkv, self.proj = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)
            self.moe = make_moe()

        def attend(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, HEADS, D // HEADS).unbind(2)
            a = f.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            return x + self.proj(a.transpose(1, 2).reshape(b, s, D))

        def forward(self, x):
            x = self.attend(x)
            return x + self.moe(self.ln2(x).contiguous())

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, D)
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(D, VOCAB)

        def forward(self, ids):
            x = self.emb(ids)
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    return Model()


def _loss(torch, model, ids):
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    for b in model.blocks:  # the torch MoE's aux loss is added by hand; moecore injects its own
        extra = getattr(b.moe, "aux_loss", None)
        if isinstance(extra, torch.Tensor):
            loss = loss + extra
    return loss


# --- a worker: one variant, in its own process ------------------------------------------------


def worker(kind: str) -> None:
    if kind.startswith("moecore"):
        # Before torch: this import decides OMP_WAIT_POLICY (see MOECORE_OMP_PASSIVE).
        importlib.import_module("moecore.integrations.torch")
    import torch

    torch.manual_seed(0)
    model = build_model(torch, "moecore" if kind.startswith("moecore") else "torch")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    layer = model.blocks[0].moe
    x_layer = torch.randn(LAYER_T, D)
    dy = torch.randn(LAYER_T, D)
    x_attn = torch.randn(BATCH, SEQ, D, requires_grad=True)

    def step():
        opt.zero_grad(set_to_none=True)
        _loss(torch, model, ids).backward()
        opt.step()

    def layer_in_step():
        for b in model.blocks:  # the torch part of a step, untimed
            b.attend(x_attn).sum().backward()
        x = x_layer.detach().requires_grad_()
        t0 = time.perf_counter()
        layer(x).backward(dy)
        return time.perf_counter() - t0

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "step":
            t0 = time.perf_counter()
            step()
            print(json.dumps({"s": time.perf_counter() - t0}), flush=True)
        elif cmd == "layer":
            print(json.dumps({"s": layer_in_step()}), flush=True)
        elif cmd == "info":
            print(
                json.dumps(
                    {
                        "threads": torch.get_num_threads(),
                        "omp": os.environ.get("OMP_WAIT_POLICY", ""),
                    }
                ),
                flush=True,
            )


def compare(rounds: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    workers = {
        name: Worker(__file__, name, [], dict(env, **extra)) for name, extra in VARIANTS.items()
    }
    try:
        info = {name: w.ask("info") for name, w in workers.items()}
        results = {}
        for cmd in ("step", "layer"):
            fns = {name: (lambda w=w, cmd=cmd: w.ask(cmd)["s"]) for name, w in workers.items()}
            samples = {n: [] for n in fns}
            # The worker's own time (not the round trip): per call, in rotating order.
            for _ in range(2):
                for f in fns.values():
                    f()
            order = list(fns)
            for r in range(rounds):
                shift = r % len(order)
                for name in order[shift:] + order[:shift]:
                    samples[name].append(fns[name]())
            results[cmd] = paired_stats(samples)
    finally:
        for w in workers.values():
            w.close()
    return {"info": info, **results}


# --- DDP over a shaped link ------------------------------------------------------------------


def ddp_rank(rank: int, port: int, hook: bool, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import moecore.integrations.torch as mt
    from moecore.compress import TopK

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(torch, "moecore"))
    state = mt.TopKHookState(TopK(0.01), dense_steps=1) if hook else None
    if state is not None:
        model.register_comm_hook(state, mt.topk_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(
        0, VOCAB, (BATCH // 2, SEQ + 1), generator=torch.Generator().manual_seed(rank)
    )
    n_grad = sum(p.numel() for p in model.parameters())
    times, sent = [], []
    for i in range(steps + 2):
        before = state.bytes_sent if state else 0
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _ddp_loss(torch, model, ids).backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            sent.append((state.bytes_sent - before) if state else 4 * n_grad)
    dist.destroy_process_group()
    Path(out).write_text(json.dumps({"step_s": times, "bytes": sent, "params": n_grad}))


def _ddp_loss(torch, model, ids):
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def ddp_compare(steps: int, prefix: list[str]) -> dict:
    results = {}
    for hook in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        outs = [f"/tmp/moecore-embed-ddp-{rank}.json" for rank in range(2)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [
            subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    __file__,
                    "--ddp-rank",
                    str(rank),
                    "--port",
                    str(port),
                    "--steps",
                    str(steps),
                ]
                + (["--hook"] if hook else [])
                + ["--out", outs[rank]],
                env=env,
            )
            for rank in range(2)
        ]
        if any(p.wait(timeout=3600) for p in procs):
            raise SystemExit("a DDP rank failed")
        ranks = [json.loads(Path(o).read_text()) for o in outs]
        results["hook" if hook else "dense"] = {
            "step_s": float(np.median([t for r in ranks for t in r["step_s"]])),
            "bytes_per_step": float(np.median(ranks[0]["bytes"])),
            "params": ranks[0]["params"],
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5, help="timed DDP steps per variant")
    ap.add_argument("--shaped", action="store_true", help="DDP over a 1 Gbit/s link (root)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ddp-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hook", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.ddp_rank is not None:
        ddp_rank(args.ddp_rank, args.port, args.hook, args.steps, args.out)
        return
    load = [open("/proc/loadavg").read().split()[:3]]
    res = compare(args.rounds)
    load.append(open("/proc/loadavg").read().split()[:3])
    tokens = BATCH * SEQ
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load}")
    print(f"threads per worker: {res['info']}")
    rows = []
    for name in VARIANTS:
        s, lay = res["step"][name], res["layer"][name]
        rows.append(
            [
                name,
                f"{s['median_s'] * 1e3:.1f}",
                f"{tokens / s['median_s']:.0f}",
                f"{s['ratio']:.2f} [{s['ratio_low']:.2f}, {s['ratio_high']:.2f}]",
                f"{lay['median_s'] * 1e3:.1f}",
                f"{lay['ratio']:.2f} [{lay['ratio_low']:.2f}, {lay['ratio_high']:.2f}]",
            ]
        )
    print(
        table(
            rows,
            [
                "variant",
                "step ms",
                "tokens/s",
                "step / moecore",
                "MoE layer in step ms",
                "layer / moecore",
            ],
        )
    )
    payload = {"cpu": cpu_name(), "load": load, "rounds": args.rounds, **res}
    if args.shaped:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from dist import NAMESPACE, shaped_namespace

        with shaped_namespace(True):
            payload["ddp_1gbit"] = ddp_compare(args.steps, ["ip", "netns", "exec", NAMESPACE])
        d = payload["ddp_1gbit"]
        print(
            table(
                [
                    [k, f"{v['step_s'] * 1e3:.0f}", f"{v['bytes_per_step'] / 1e6:.2f}"]
                    for k, v in d.items()
                ],
                ["DDP, 2 gloo ranks, 1 Gbit/s", "step ms", "MB sent per rank and step"],
            )
        )
    print(f"-> {write_results('embed', payload)}")


if __name__ == "__main__":
    main()
