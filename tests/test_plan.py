"""The step-time simulator (``moecore.comm.simulate``, ``moecore plan``): hand-computed
cases, the profile of a real backward, and the command."""

import json

import numpy as np
import pytest

import moecore as mc
from moecore import nn, ops
from moecore.cli import main
from moecore.comm import CostModel, GradSpec, Link, Scheduler, StepProfile, simulate
from moecore.errors import SchedulerMisuse
from moecore.train.plan import plan, profile_step

MB = 1 << 20
# 1e6 bytes/s, no latency: a 4000-byte all-reduce between 2 ranks takes 2·(1/2)·4 ms = 4 ms.
SLOW = Link(0.0, 8e-3)
COST = CostModel(intra=SLOW, inter=SLOW)


def four_buckets(world):
    specs = [GradSpec(f"g{i}", 1000, layer=i) for i in range(4)]
    return Scheduler(specs, world=world, first_bucket_mb=4000 / MB, bucket_mb=4000 / MB)


def profile(each):
    return StepProfile(0.5, (3, 2, 1, 0), (each,) * 4, 0.25)


def test_backward_longer_than_communication_hides_all_but_the_last_bucket():
    r = simulate(four_buckets(2), profile(0.010), COST)
    assert r["ops"] == 4
    assert r["comm_s"] == pytest.approx(0.016)
    assert r["compute_s"] == pytest.approx(0.79)
    assert r["exposed_s"] == pytest.approx(0.004)


def test_link_bound_step():
    # The link is busy from the first gradient (1 ms into backward) for 16 ms.
    r = simulate(four_buckets(2), profile(0.001), COST)
    assert r["step_s"] == pytest.approx(0.5 + 0.001 + 0.016 + 0.25)


def test_compression_and_world_size():
    specs = [GradSpec("w", 1 << 20)]
    dense = simulate(Scheduler(specs, world=8), StepProfile(0, (0,), (0.001,), 0), COST)
    topk = Scheduler(specs, world=8, compress_ratio=0.01)
    comp = simulate(topk, StepProfile(0, (0,), (0.001,), 0), COST)
    assert comp["compressed_buckets"] == 1
    # Dense: 2·7/8·4 MiB / 1e6 B/s; top-k: 7 · (44 + 8·10486) B / 1e6 B/s.
    assert dense["comm_s"] == pytest.approx(2 * 7 / 8 * 4 * MB / 1e6)
    assert comp["comm_s"] == pytest.approx(7 * (44 + 8 * 10486) / 1e6)


def test_the_ranks_own_work_delays_the_step():
    # Backward 10 ms per gradient hides the 4 ms all-reduces; what the rank does itself
    # does not hide: 4 buckets of 4000 bytes copied at 1 µs/byte = 16 ms more, by hand.
    cost = CostModel(intra=SLOW, inter=SLOW, copy_s_per_byte=1e-6)
    base = simulate(four_buckets(2), profile(0.010), COST)
    r = simulate(four_buckets(2), profile(0.010), cost)
    assert r["step_s"] == pytest.approx(base["step_s"] + 0.016)
    # Compression before the launch and decoding after the wait: on one 4 MiB bucket at
    # 1 ns per element and 1 µs per received entry (8 ranks × 10486 entries).
    specs = [GradSpec("w", 1 << 20)]
    topk = Scheduler(specs, world=8, compress_ratio=0.01)
    free = CostModel(intra=Link(0.0, 1e12), inter=Link(0.0, 1e12))
    work = CostModel(
        intra=free.intra, inter=free.inter, compress_s_per_elem=1e-9, decode_s_per_entry=1e-6
    )
    one = StepProfile(0, (0,), (0.001,), 0)
    extra = simulate(topk, one, work)["step_s"] - simulate(topk, one, free)["step_s"]
    assert extra == pytest.approx((1 << 20) * 1e-9 + 8 * 10486 * 1e-6, rel=1e-6)
    with pytest.raises(SchedulerMisuse, match="copy_s_per_byte"):
        simulate(four_buckets(2), profile(0.01), CostModel(copy_s_per_byte=float("nan")))
    with pytest.raises(SchedulerMisuse, match="fault_s_per_byte"):
        simulate(four_buckets(2), profile(0.01), CostModel(fault_s_per_byte=-1.0))


def test_bad_profile_raises():
    with pytest.raises(SchedulerMisuse, match="backward times"):
        simulate(four_buckets(2), StepProfile(0.1, (3, 2, 1, 0), (0.1,), 0.1), COST)
    with pytest.raises(SchedulerMisuse, match="bandwidth"):
        simulate(four_buckets(2), profile(0.01), CostModel(inter=Link(0.0, 0.0)))


def test_zero_stages_by_hand():
    # 2 ms per reduce-scatter or all-gather of a 4000-byte bucket; the optimizer's half from
    # stage 1 on; stages 1-2 all-gather the 4 buckets at the end (8 ms).
    want = {0: 0.5 + 0.04 + 0.004 + 0.25, 1: 0.5 + 0.04 + 0.004 + 0.125 + 0.008}
    want[2] = 0.5 + 0.04 + 0.002 + 0.125 + 0.008
    for stage, step in want.items():
        r = simulate(four_buckets(2), profile(0.010), COST, zero=stage)
        assert r["step_s"] == pytest.approx(step), stage
    # Stage 3, the root and 3 blocks of one gradient and 0.1 s forward each: forward pays
    # the root's and the first block's gathers (4 ms); backward the root's behind the last
    # block's prefetch (4 ms), then 2 ms of the last reduce-scatter; optimizer's half.
    units = [([u], 0.1) for u in range(4)]
    r = simulate(four_buckets(2), profile(0.010), COST, zero=3, units=units)
    assert r["step_s"] == pytest.approx(0.004 + 0.4 + 0.004 + 0.04 + 0.002 + 0.125)
    with pytest.raises(SchedulerMisuse, match="gradient 3 is in none"):
        simulate(four_buckets(2), profile(0.010), COST, zero=3, units=[([0, 1, 2], 0.1)])
    with pytest.raises(ValueError, match="zero: a stage 0-3"):
        simulate(four_buckets(2), profile(0.010), COST, zero=5)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x, y):
        d = self.b(self.a(mc.tensor(x))) - mc.tensor(y)
        return ops.mean(d * d)


def profiled(make, rows, d_in, y):
    """A model made under a fixed seed, and the profile of one step on `rows` random inputs
    of width `d_in` against the target `y`."""
    mc.manual_seed(0)
    m = make()
    x = np.random.default_rng(0).standard_normal((rows, d_in)).astype(np.float32)
    return m, profile_step(m, x, y)


def test_profile_step_orders_gradients_as_backward_finishes_them():
    m, p = profiled(Tiny, 5, 8, np.zeros((5, 4), np.float32))
    names = [n for n, _ in m.named_parameters()]
    # The output layer's gradients are ready before the input layer's.
    order = [names[i] for i in p.ready_order]
    assert sorted(order) == sorted(names)
    assert max(order.index("b.weight"), order.index("b.bias")) < min(
        order.index("a.weight"), order.index("a.bias")
    )
    assert p.forward_s > 0 and all(t >= 0 for t in p.backward_s)
    assert all(q.grad is None for q in m.parameters())


def test_plan_command(capsys):
    code = main(["plan", "--preset", "moe-tiny", "--workers", "2", "64", "--gbit", "1", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["workers"], r["variant"]) for r in rows] == [
        (w, v) for w in (2, 64) for v in ("dense fifo", "dense priority", "top-k 0.01")
    ]
    for r in rows:
        assert r["step_s"] >= r["compute_s"] - 1e-12
        assert r["exposed_s"] == pytest.approx(r["step_s"] - r["compute_s"], abs=1e-12)
    assert main(["plan", "--preset", "moe-tiny", "--workers", "0"]) == 2
    assert main(["plan", "--preset", "moe-tiny", "--compress", "gzip"]) == 2


def test_plan_compares_bucket_caps(capsys):
    # Several caps: each (workers, cap) has every variant, and each row equals a plan made
    # with that cap alone (the caps do not leak into one another).
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(512, 1024)  # 2 MiB of weights
            self.b = nn.Linear(1024, 512)

        def forward(self, x, y):
            return ops.mean(self.b(self.a(mc.tensor(x))) * mc.tensor(y))

    m, prof = profiled(Wide, 4, 512, np.ones((4, 512), np.float32))
    names = [n for n, _ in m.named_parameters()]
    assert [names[i] for i in prof.ready_order] == ["b.weight", "b.bias", "a.weight", "a.bias"]
    caps = [25.0, 1.0]
    rows = plan(m, prof, [2, 8], COST, 0.5, caps)
    assert [(r["workers"], r["bucket_mb"]) for r in rows] == [
        (w, c) for w in (2, 8) for c in caps for _ in range(3)
    ]
    for cap in caps:
        alone = plan(m, prof, [2, 8], COST, 0.5, cap)
        assert [r for r in rows if r["bucket_mb"] == cap] == alone
    # By hand, in the profiled ready order b.weight, b.bias, a.weight, a.bias (asserted), a
    # bucket closing once it holds its cap as in DDP: the 1 MiB first bucket closes on
    # b.weight (2 MiB); with a 25 MiB cap the rest is one bucket, with a 1 MiB cap a.weight
    # closes a second one and a.bias goes alone.
    ops_of = {r["bucket_mb"]: r["ops"] for r in rows if r["variant"] == "dense fifo"}
    assert ops_of == {25.0: 2, 1.0: 3}
    with pytest.raises(ValueError, match="bucket_mb"):
        plan(m, prof, [2], COST, None, [25, 0])

    code = main(["plan", "--preset", "moe-tiny", "--workers", "2", "--bucket-mb", "25", "1"])
    assert code == 0
    out = capsys.readouterr().out
    # One row per cap and variant, one cap marked fastest per variant.
    assert out.count("<- fastest cap") == 3
    assert sum(line.split()[:2] == ["2", "25"] for line in out.splitlines()) == 3
    assert sum(line.split()[:2] == ["2", "1"] for line in out.splitlines()) == 3
    assert main(["plan", "--preset", "moe-tiny", "--bucket-mb", "0"]) == 2
