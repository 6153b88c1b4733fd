"""Run under ``mpiexec -n P python -m mpi4py dp_worker.py MODE``; raises (and so aborts every
rank) when a check fails. Rank 0 prints ``OK <mode>`` at the end."""

from __future__ import annotations

import sys

import numpy as np

import moecore as mc
import moecore.distributed as dist
from moecore import nn, ops, optim
from moecore.compress import TopK
from moecore.models import ModelConfig, MoETransformer

SEQ, PER_RANK = 8, 2
CFG = ModelConfig(
    vocab_size=32,
    d_model=16,
    n_layers=2,
    n_heads=2,
    seq_len=SEQ,
    n_experts=4,
    top_k=1,
    d_ff=16,
    dense_d_ff=32,
    aux_loss=0.0,
)


def model(seed=1):
    mc.manual_seed(seed)
    return MoETransformer(CFG)


def batch(step, world):
    rng = np.random.default_rng(100 + step)
    ids = rng.integers(0, CFG.vocab_size, size=(PER_RANK * world, SEQ + 1))
    return ids[:, :-1], ids[:, 1:]


def local(x, rank):
    return x[rank * PER_RANK : (rank + 1) * PER_RANK]


def grads_of(m):
    return {
        n: np.zeros_like(p.data) if p.grad is None else p.grad.copy()
        for n, p in m.named_parameters()
    }


def check_close(got, want, rtol, atol, what):
    for name in want:
        if not np.allclose(got[name], want[name], rtol=rtol, atol=atol):
            err = np.abs(got[name] - want[name]).max()
            raise AssertionError(f"{what}: gradient of {name} differs by {err:.3g}")


def mode_grads(g, **dp_kwargs):
    """DP gradients equal the single-process gradients of the concatenated batch, for three
    steps (buckets are rebuilt after the first), with small buckets so there are many."""
    m = model()
    dp = dist.DataParallel(m, g, bucket_mb=0.004, first_bucket_mb=0.001, **dp_kwargs)
    ref = model()
    opt, ref_opt = optim.SGD(m.parameters(), lr=0.1), optim.SGD(ref.parameters(), lr=0.1)
    assert len(dp.buckets) > 3, dp.buckets
    for step in range(3):
        x, y = batch(step, g.size)
        dp(local(x, g.rank), local(y, g.rank)).backward()
        dp.finish()
        ref(x, y).backward()
        check_close(grads_of(m), grads_of(ref), 2e-4, 2e-6, f"step {step}")
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()
    assert dp.scheduler.rebuilt


def mode_grads_view(g):
    """gradient_as_bucket_view: the same gradients, each ``.grad`` a view of its bucket; and
    with no zero_grad between steps, backward accumulates into the bucket exactly as it
    would into a ``.grad`` of its own (across the rebuild after step 1, too)."""
    mode_grads(g, gradient_as_bucket_view=True)
    m, ref = model(), model()
    dp = dist.DataParallel(
        m, g, bucket_mb=0.004, first_bucket_mb=0.001, gradient_as_bucket_view=True
    )
    for step in range(3):
        x, y = batch(step, g.size)
        dp(local(x, g.rank), local(y, g.rank)).backward()
        averaged_in = list(dp.buffers)  # finish() may rebuild the buckets afterwards
        dp.finish()
        ref(x, y).backward()
        check_close(grads_of(m), grads_of(ref), 2e-4, 2e-6, f"accumulated step {step}")
        for p in m.parameters():
            if not any(np.shares_memory(p.grad, b) for b in averaged_in):
                raise AssertionError("a .grad is not a view of a bucket")


class Partial(nn.Module):
    """``extra`` is used on rank 0 only: the others never produce its gradient."""

    def __init__(self, use_extra):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)
        self.use_extra = use_extra

    def forward(self, x):
        h = self.a(x)
        if self.use_extra:
            h = self.extra(h)
        return ops.mean(h * h)


def mode_zero(g):
    """Only rank 0 produces ``extra``'s gradient; the others send zeros, so every rank ends
    with rank 0's gradient divided by the world size (the mean over all ranks — not over
    the ranks that produced it). Rank 0's gradient is saved before ``finish`` averages it."""
    mc.manual_seed(3)
    m = Partial(use_extra=g.rank == 0)
    dp = dist.DataParallel(m, g)
    x = mc.tensor(np.random.default_rng(g.rank).standard_normal((5, 4)).astype(np.float32))
    dp(x).backward()
    assert (m.extra.weight.grad is None) == (g.rank != 0)
    produced = m.extra.weight.grad.copy() if g.rank == 0 else np.zeros((4, 4), np.float32)
    g.broadcast(produced, root=0)
    assert np.abs(produced).max() > 0
    dp.finish()
    np.testing.assert_allclose(m.extra.weight.grad, produced / g.size, rtol=1e-6)


def mode_ratio1(g):
    """Top-k at ratio 1.0 through the compressed all-gather equals dense all-reduce."""
    dense, comp = model(), model()
    dp_d = dist.DataParallel(dense, g, bucket_mb=0.004, first_bucket_mb=0.001)
    comp_dp = dist.DataParallel(
        comp,
        g,
        bucket_mb=0.004,
        first_bucket_mb=0.001,
        compress=TopK(ratio=1.0, method="exact"),
        compress_when="always",
    )
    for step in range(2):
        x, y = batch(step, g.size)
        for dp in (dp_d, comp_dp):
            dp(local(x, g.rank), local(y, g.rank)).backward()
            dp.finish()
        assert set(comp_dp.scheduler.transports()) == {"allgather"}
        check_close(grads_of(comp), grads_of(dense), 1e-5, 1e-7, f"step {step}")
        for m in (dense, comp):
            m.zero_grad()


class Regression(nn.Module):
    """Least squares towards a fixed linear map: a problem dense SGD solves in 50 steps."""

    def __init__(self):
        super().__init__()
        # PyTorch's fan-in init, as when mode_ef's tolerance was measured: under GPT-2's
        # N(0, 0.02) both layers start near zero, dense SGD travels another path and the
        # ratio the test states (top-k's distance to dense over dense's distance) changes.
        self.a = nn.Linear(16, 32, init="torch")
        self.b = nn.Linear(32, 4, init="torch")

    def forward(self, x, y):
        d = self.b(self.a(x)) - y
        return ops.mean(d * d)


def regression_batch(step, world, rows=16):
    target = np.random.default_rng(7).standard_normal((16, 4)).astype(np.float32)
    x = np.random.default_rng(1000 + step).standard_normal((rows * world, 16)).astype(np.float32)
    return x, x @ target


def mode_ef(g, steps=50, ratio=0.1, lr=0.05):
    """Top-k (ratio 0.1) with error feedback stays near dense SGD over 50 steps: prints
    ||p_topk - p_dense|| / ||p_dense - p_0|| and the final losses (the test states the
    tolerance), and checks that every rank holds the same parameters."""
    runs = {}
    for name, compress in (
        ("dense", None),
        ("ef", TopK(ratio)),
        ("noef", TopK(ratio, error_feedback=False)),
    ):
        mc.manual_seed(5)
        m = Regression()
        p0 = np.concatenate([p.data.ravel() for p in m.parameters()])
        dp = dist.DataParallel(m, g, compress=compress, compress_when="always")
        opt = optim.SGD(m.parameters(), lr=lr)
        for step in range(steps):
            x, y = regression_batch(step, g.size)
            loss = dp(mc.tensor(local_rows(x, g)), mc.tensor(local_rows(y, g)))
            loss.backward()
            dp.finish()
            opt.step()
            opt.zero_grad()
        p = np.concatenate([q.data.ravel() for q in m.parameters()])
        got = np.empty((g.size, p.size), np.float32)
        g.allgather(p.astype(np.float32), got)
        assert (got == got[0]).all(), f"{name}: ranks diverged"
        x, y = regression_batch(10_000, 1, rows=256)
        with mc.no_grad():
            runs[name] = (p, m(mc.tensor(x), mc.tensor(y)).item())
    pd, p0 = runs["dense"][0], p0
    for name in ("ef", "noef"):
        rel = float(np.linalg.norm(runs[name][0] - pd) / np.linalg.norm(pd - p0))
        if g.rank == 0:
            print(f"REL_{name.upper()} {rel:.6f} LOSS_{name.upper()} {runs[name][1]:.6f}")
    if g.rank == 0:
        print(f"LOSS_DENSE {runs['dense'][1]:.6f} LOSS_INIT {runs_init_loss():.6f}")


def mode_nonfinite_compressed(g):
    """Rank 1's gradient is NaN in step 1 (a NaN in its input). With top-k compression,
    as with a dense all-reduce, every rank's averaged gradient becomes NaN — nobody raises —
    rank 1's residual keeps its value of step 0, and step 2 goes on finite and identical on
    every rank."""
    mc.manual_seed(5)
    m = Regression()
    dp = dist.DataParallel(m, g, compress="topk:0.1", compress_when="always")
    names = [f"bucket{b}" for b in range(len(dp.buckets))]
    for step in range(3):
        x, y = regression_batch(step, g.size)
        x = local_rows(x, g).copy()
        if step == 1 and g.rank == 1:
            x[3, 5] = np.nan
        if step == 1:  # buckets are compressed during backward
            before = {n: dp.compressor.residual(n).copy() for n in names}
        dp(mc.tensor(x), mc.tensor(local_rows(y, g))).backward()
        dp.finish()
        grads = np.concatenate([p.grad.ravel() for p in m.parameters()])
        if step == 1:
            assert np.isnan(grads).all(), f"rank {g.rank}: step 1 gradient not all NaN"
            if g.rank == 1:
                for n in names:
                    assert np.array_equal(dp.compressor.residual(n), before[n]), n
        else:
            assert np.isfinite(grads).all(), f"rank {g.rank}: step {step} gradient not finite"
            got = np.empty((g.size, grads.size), np.float32)
            g.allgather(grads.astype(np.float32), got)
            assert (got == got[0]).all(), f"step {step}: ranks' averaged gradients differ"
        m.zero_grad()
    for n in names:
        assert np.isfinite(dp.compressor.residual(n)).all(), n
    print(f"NONFINITE_HANDLED rank={g.rank}", flush=True)


def runs_init_loss():
    mc.manual_seed(5)
    m = Regression()
    x, y = regression_batch(10_000, 1, rows=256)
    with mc.no_grad():
        return m(mc.tensor(x), mc.tensor(y)).item()


def local_rows(a, g):
    n = a.shape[0] // g.size
    return a[g.rank * n : (g.rank + 1) * n]


def mode_ep(g, tokens=12, d=8, experts=4):
    """Expert parallel (experts split over the ranks) forward and backward equal the
    single-process MoE layer on the concatenated tokens."""
    from moecore.distributed.expert_parallel import ExpertParallelMoE

    mc.manual_seed(11)
    full = nn.MoE(d, 6, n_experts=experts, top_k=2, aux_loss=0.0)
    ep = ExpertParallelMoE.from_moe(full, g)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((g.size, tokens, d)).astype(np.float32)
    # Skewed tokens so that some rank sends nothing to some expert.
    xs[0] += 3 * full.router.data[0] / np.linalg.norm(full.router.data[0])
    cs = rng.standard_normal((g.size, tokens, d)).astype(np.float32)
    # Reference: the whole layer on all tokens, loss = sum(y * c).
    x_full = mc.tensor(xs.reshape(-1, d), requires_grad=True)
    y_full = full(x_full)
    (y_full * mc.tensor(cs.reshape(-1, d))).sum().backward()
    x = mc.tensor(xs[g.rank], requires_grad=True)
    y = ep(x)
    (y * mc.tensor(cs[g.rank])).sum().backward()
    rows = slice(g.rank * tokens, (g.rank + 1) * tokens)
    np.testing.assert_allclose(y.data, y_full.data[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.grad, x_full.grad[rows], rtol=1e-4, atol=1e-5)
    n = experts // g.size
    mine = slice(g.rank * n, (g.rank + 1) * n)
    np.testing.assert_allclose(ep.w1.grad, full.w1.grad[mine], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ep.w2.grad, full.w2.grad[mine], rtol=1e-4, atol=1e-5)
    router = ep.router.grad.copy()
    g.allreduce(router)
    np.testing.assert_allclose(router, full.router.grad, rtol=1e-4, atol=1e-5)


def mode_ep_full(g, tokens=10, d=8, experts=4, ep=2):
    """Expert parallel over ``ep`` ranks (data parallel across the rest) with what the
    trainer uses — Switch aux loss, z-loss, shared experts, softmax and sigmoid with
    group-limited routing, the aux-loss-free bias — equals one process holding every token:
    outputs, averaged gradients, aux-loss value and the bias update."""
    from moecore.distributed.expert_parallel import ExpertParallelMoE

    world = g.size
    ep_group = g.split(g.rank // ep)
    twins = g.split(g.rank % ep)  # the ranks holding the same experts
    variants = [
        dict(score="softmax", aux_loss=0.05, z_loss=0.01, n_shared_experts=1),
        dict(
            score="sigmoid",
            n_groups=2,
            topk_groups=1,
            aux_loss=0.05,
            bias_update_rate=0.01,
            activation="swiglu",
        ),
        dict(score="softmax", aux_loss=0.05, z_loss=0.01),
    ]
    # The last variant's injected aux gradients are halved (a micro-batch of grad_accum=2):
    # from_moe copies the scale, and the sharded layer must apply it as the full one does.
    scales = [1.0, 1.0, 0.5]
    for v, kwargs in enumerate(variants):
        mc.manual_seed(11 + v)
        full = nn.MoE(d, 6, n_experts=experts, top_k=2, **kwargs)
        full.aux_loss_scale = scales[v]
        rng = np.random.default_rng(v)
        full.expert_bias[...] = 0.3 * rng.standard_normal(experts).astype(np.float32)
        layer = ExpertParallelMoE.from_moe(full, ep_group, stats_group=g)
        assert layer.aux_loss_scale == scales[v]
        xs = rng.standard_normal((world, tokens, d)).astype(np.float32)
        xs[0] += 3 * full.router.data[0] / np.linalg.norm(full.router.data[0])
        cs = rng.standard_normal((world, tokens, d)).astype(np.float32)
        # Reference: the mean over ranks of sum(y * c) (+ the aux losses, added by the op).
        x_full = mc.tensor(xs.reshape(-1, d), requires_grad=True)
        y_full = full(x_full)
        ((y_full * mc.tensor(cs.reshape(-1, d))).sum() * (1.0 / world)).backward()
        x = mc.tensor(xs[g.rank], requires_grad=True)
        y = layer(x)
        (y * mc.tensor(cs[g.rank])).sum().backward()
        rows = slice(g.rank * tokens, (g.rank + 1) * tokens)
        tol = dict(rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(y.data, y_full.data[rows], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x.grad / world, x_full.grad[rows], **tol)
        np.testing.assert_allclose(layer.last_stats["aux_loss"], full.last_stats["aux_loss"], 1e-5)
        # Replicated parameters: averaged over every rank.
        for name, p in layer.named_parameters():
            grad = p.grad.copy()
            if name in ("w1", "w2"):
                twins.allreduce(grad)  # each rank's experts sum their ep group's tokens
                n = experts // ep
                want = getattr(full, name).grad[ep_group.rank * n : (ep_group.rank + 1) * n]
            else:
                g.allreduce(grad)
                want = dict(full.named_parameters())[name].grad
            np.testing.assert_allclose(grad / world, want, err_msg=f"{v}: {name}", **tol)
        load = layer._load_since_update.copy()
        g.allreduce(load)
        np.testing.assert_array_equal(load, full._load_since_update)
        layer._load_since_update[...] = load
        layer.update_bias()
        full.update_bias()
        np.testing.assert_array_equal(layer.expert_bias, full.expert_bias)


def mode_layout(g, ep=2, max_norm=0.05):
    """``moecore.train.parallel.Layout`` on ``dp × ep`` ranks, each with its rows of the
    batch: after ``finish`` every gradient — replicated ones averaged over the world,
    experts averaged over the ranks holding them and divided by ``ep`` — is the
    single-process gradient of the whole batch's mean loss (Switch aux loss included),
    compared directly rather than through AdamW, which a constant factor would not change.
    ``clip_grad_norm_`` returns the single-process norm of the whole sharded model and
    leaves the single-process clipped gradients."""
    import dataclasses

    from moecore.optim import clip_grad_norm_
    from moecore.train.parallel import Layout

    cfg = dataclasses.replace(CFG, aux_loss=0.01, top_k=2)
    mc.manual_seed(1)
    full = MoETransformer(cfg)
    mc.manual_seed(1)
    sharded = MoETransformer(cfg)
    lay = Layout(g, ep)
    lay.shard_model(sharded)
    lay.data_parallel(sharded)
    assert lay.sharded, "no expert was sharded"
    x, y = batch(0, g.size)
    full(x, y).backward()
    sharded(local(x, g.rank), local(y, g.rank)).backward()
    lay.finish()
    want = {n: p.grad for n, p in full.named_parameters()}

    def check(what):
        for name, p in sharded.named_parameters():
            ref = lay.shard(name, want[name])
            np.testing.assert_allclose(
                p.grad, ref, rtol=2e-4, atol=1e-7, err_msg=f"{what}: gradient of {name}"
            )

    check("averaged")
    want_norm = clip_grad_norm_(list(full.parameters()), max_norm)
    assert want_norm > 2 * max_norm, want_norm  # so the clipping is exercised
    got_norm = lay.clip_grad_norm_(max_norm)
    np.testing.assert_allclose(got_norm, want_norm, rtol=1e-5)
    check("clipped")


def mode_hier(g):
    """4 ranks as 2 nodes x 2: the hierarchical all-reduce equals the flat one (blocking and
    many non-blocking in flight), and data parallelism over it equals single process."""
    from moecore.distributed.hierarchical import HierarchicalGroup

    h = HierarchicalGroup(g, ranks_per_node=2)
    rng = np.random.default_rng(g.rank)
    for n in (1, 3, 1000, 4097):
        a = rng.standard_normal(n).astype(np.float32)
        flat = a.copy()
        g.allreduce(flat)
        h.allreduce(a)
        np.testing.assert_allclose(a, flat, rtol=1e-5, atol=1e-6)
    bufs = [rng.standard_normal(n).astype(np.float32) for n in (5, 300, 7, 2000)]
    want = [b.copy() for b in bufs]
    for w in want:
        g.allreduce(w)
    reqs = [h.iallreduce(b) for b in bufs]
    while not all(r.test() for r in reqs):
        pass
    for b, w in zip(bufs, want):
        np.testing.assert_allclose(b, w, rtol=1e-5, atol=1e-6)
    mx = np.array([g.rank], np.float32)
    h.allreduce(mx, op="max")
    assert mx[0] == g.size - 1
    mode_grads(h)


def mode_raise(g):
    if g.rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    buf = np.zeros(4, np.float32)
    g.allreduce(buf)  # never completes: rank 1 is gone


def mode_kill9(g, progress="hooks"):
    """Rank 1 dies by SIGKILL in its third training step, after backward (no exception, no
    MPI_Abort, nothing flushed): the others wait in that step's all-reduces until the launcher
    ends them."""
    import os
    import signal

    m = model()
    dp = dist.DataParallel(m, g, bucket_mb=0.004, first_bucket_mb=0.001, progress=progress)
    opt = optim.SGD(m.parameters(), lr=0.1)
    for step in range(5):
        x, y = batch(step, g.size)
        dp(local(x, g.rank), local(y, g.rank)).backward()
        if step == 2 and g.rank == 1:
            print("KILLING rank 1 in step 2", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        dp.finish()
        opt.step()
        opt.zero_grad()


def mode_mismatch(g, what="shape"):
    """The ranks' models differ (a user's bug): DataParallel must refuse on every rank with
    the difference named, never hang in a collective of mismatched sizes."""
    import dataclasses

    cfg = CFG
    if g.rank == 1:
        cfg = dataclasses.replace(CFG, **({"d_ff": 24} if what == "shape" else {"n_layers": 3}))
    mc.manual_seed(1)
    m = MoETransformer(cfg)
    try:
        dist.DataParallel(m, g)
    except ValueError as e:
        print(f"REFUSED rank={g.rank}: {e}", flush=True)
        return
    raise AssertionError("DataParallel accepted models that differ")


def mode_mismatched_settings(g, what):
    """Same model, other communication settings on rank 1 (an MPMD launch, a config file
    edited on one node): refused on every rank with the setting named. Before the check,
    another bucket size hung and compression on one rank only died of a corrupt payload."""
    kwargs = {
        "bucket": {"bucket_mb": 0.004, "first_bucket_mb": 0.001},
        "compress": {"compress": "topk:0.01"},
    }[what]
    try:
        dist.DataParallel(model(), g, **(kwargs if g.rank == 1 else {}))
    except ValueError as e:
        print(f"REFUSED rank={g.rank}: {e}", flush=True)
        return
    raise AssertionError("DataParallel accepted settings that differ")


def mode_stuck(g):
    """Rank 1 hangs (alive, never reaching its all-reduces) in the third step: rank 0's
    DataParallel's watchdog ends the job 2 s into its wait."""
    import time

    m = model()
    dp = dist.DataParallel(m, g, bucket_mb=0.004, first_bucket_mb=0.001, timeout=2)
    for step in range(5):
        x, y = batch(step, g.size)
        if step == 2 and g.rank == 1:
            print("STUCK rank 1 in step 2", flush=True)
            time.sleep(600)
        dp(local(x, g.rank), local(y, g.rank)).backward()
        dp.finish()


def mode_stuck_at(g, where):
    """Rank 1 hangs before a collective outside DataParallel.finish — the construction of
    DataParallel (its model check and broadcasts) or an expert-parallel forward (its
    all-to-alls): rank 0's group watchdog ends the job 2 s into its wait."""
    import time

    from moecore.distributed.expert_parallel import ExpertParallelMoE

    g = dist.MPIGroup(timeout=2)
    mc.manual_seed(11)
    layer = nn.MoE(8, 6, n_experts=4, top_k=2, aux_loss=0.0)
    if where == "ep":
        layer = ExpertParallelMoE.from_moe(layer, g)
    if g.rank == 1:
        print(f"STUCK rank 1 before {where}", flush=True)
        time.sleep(600)
    if where == "ep":
        layer(mc.tensor(np.ones((4, 8), np.float32)))
    else:
        dist.DataParallel(layer, g)


def mode_library(g):
    """Each rank prints the MPI library it runs on."""
    from mpi4py import MPI

    line = MPI.Get_library_version().strip().splitlines()[0]
    for rank in range(g.size):
        if rank == g.rank:
            print(f"LIBRARY rank={g.rank} {line}", flush=True)
        g.barrier()


MODES = {
    "grads": mode_grads,
    "grads_priority": lambda g: mode_grads(
        g, policy="priority", partition_mb=0.0005, credit_mb=0.002
    ),
    "grads_thread": lambda g: mode_grads(g, progress="thread"),
    "grads_view": mode_grads_view,
    "zero": mode_zero,
    "ratio1": mode_ratio1,
    "ef": mode_ef,
    "ep": mode_ep,
    "ep_full": mode_ep_full,
    "layout": mode_layout,
    "hier": mode_hier,
    "raise": mode_raise,
    "kill9": mode_kill9,
    "kill9_thread": lambda g: mode_kill9(g, progress="thread"),
    "library": mode_library,
    "stuck": mode_stuck,
    "nonfinite_compressed": mode_nonfinite_compressed,
    "stuck_dp": lambda g: mode_stuck_at(g, "dp"),
    "stuck_ep": lambda g: mode_stuck_at(g, "ep"),
    "mismatch_shape": mode_mismatch,
    "mismatch_count": lambda g: mode_mismatch(g, "count"),
    "mismatch_bucket": lambda g: mode_mismatched_settings(g, "bucket"),
    "mismatch_compress": lambda g: mode_mismatched_settings(g, "compress"),
}

if __name__ == "__main__":
    group = dist.init()
    MODES[sys.argv[1]](group)
    group.barrier()
    if group.rank == 0:
        print(f"OK {sys.argv[1]} size={group.size}", flush=True)
