"""The communication scheduler's Python face: DDP bucket layout by hand, launch order,
priority's partitions and credit, transport decisions, rebuild, and errors."""

import pytest

from moecore.comm import Action, GradSpec, Scheduler
from moecore.errors import SchedulerMisuse

MB = 1 << 20


def specs(*numels):
    return [GradSpec(f"g{i}", n, "float32", layer=i) for i, n in enumerate(numels)]


def test_ddp_buckets_reverse_order_small_first_then_capped():
    # 1 MiB = 262144 floats: g3 + g2 (1.5 MiB) close the first bucket; g1 + g0 stay under 2 MiB.
    s = Scheduler(specs(200_000, 200_000, 200_000, 200_000), world=2, bucket_mb=2)
    b = s.buckets()
    assert [[x[0] for x in bk.slices] for bk in b] == [[3, 2], [1, 0]]
    assert b[0].slices == ((3, 0, 200_000), (2, 200_000, 200_000))
    assert b[1].layer == 0 and b[0].layer == 2
    assert b[0].bytes == 1_600_000


def test_fifo_launches_in_bucket_order_as_buckets_complete():
    s = Scheduler(specs(10, 10, 10), world=2, first_bucket_mb=40 / MB, bucket_mb=40 / MB)
    s.begin_step()
    assert s.ready(0) == []  # bucket 2 ([g0]) cannot go before buckets 0 and 1
    assert s.ready(2) == [Action("launch", 0, 0, 0, 10, "allreduce")]
    assert [a.bucket for a in s.ready(1)] == [1, 2]
    assert [a.kind for a in s.finish()] == ["wait"] * 3
    assert s.step == 1


def test_priority_partitions_and_waits_for_credit_during_backward():
    s = Scheduler(
        specs(100, 100),
        world=2,
        first_bucket_mb=400 / MB,
        policy="priority",
        partition_mb=160 / MB,
        credit_mb=320 / MB,
    )
    s.begin_step()
    sizes = {op: nbytes for op, _, _, _, _, nbytes, _ in s.ops()}
    # Gradient 1 (400 B) is the first bucket: parts of 40, 40, 20 floats; the third does not
    # fit the credit beside the first two, so it waits for the oldest, still in backward.
    first = s.ready(1)
    assert [(a.kind, a.offset, a.numel) for a in first if a.kind == "launch"] == [
        ("launch", 0, 40),
        ("launch", 40, 40),
        ("launch", 80, 20),
    ]
    assert [a.kind for a in first] == ["launch", "launch", "wait", "launch"]
    assert first[2].op == first[0].op
    in_flight = 0
    for a in first + s.ready(0) + s.finish():
        in_flight += sizes[a.op] * (1 if a.kind == "launch" else -1)
        assert in_flight <= 320
    assert in_flight == 0


def test_compression_after_warmup_when_cheaper():
    s = Scheduler(specs(1 << 20), world=8, compress_ratio=0.01, warmup_steps=1)
    s.begin_step()
    assert s.transports() == ["allreduce"]
    s.finish()
    s.begin_step()
    assert s.transports() == ["allgather"]
    s.finish()
    dense_wins = Scheduler(specs(1 << 20), world=8, compress_ratio=0.5)
    dense_wins.begin_step()
    assert dense_wins.transports() == ["allreduce"]


def test_rebuild_from_observed_order():
    s = Scheduler(specs(10, 10, 10), world=2, first_bucket_mb=40 / MB, bucket_mb=80 / MB)
    assert s.observed_order() is None
    s.begin_step()
    s.ready(0)
    s.finish()
    assert s.observed_order() == [0, 1, 2]
    s.rebuild([0, 1, 2])
    assert [[x[0] for x in b.slices] for b in s.buckets()] == [[0], [1, 2]]
    with pytest.raises(SchedulerMisuse, match="already rebuilt"):
        s.rebuild([0, 1, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "lifo"}, "policy"),
        ({"compress_ratio": 0.0}, "ratio"),
        ({"compress_ratio": 0.1, "compress_when": "never"}, "compress_when"),
        ({"bucket_mb": 0}, "bucket_mb"),
        ({"world": 0}, "world"),
    ],
)
def test_bad_config(kwargs, match):
    args = {"world": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        Scheduler(specs(10), **args)


def test_misuse_raises_scheduler_misuse():
    with pytest.raises(SchedulerMisuse, match="no gradients"):
        Scheduler([], world=2)
    s = Scheduler(specs(10, 10), world=2)
    with pytest.raises(SchedulerMisuse, match="outside a step"):
        s.ready(0)
    s.begin_step()
    with pytest.raises(SchedulerMisuse, match="out of range"):
        s.ready(7)
    s.ready(1)
    with pytest.raises(SchedulerMisuse, match="twice"):
        s.ready(1)
    with pytest.raises(ValueError, match="non-negative"):
        s.ready(-1)
    s.finish()
    with pytest.raises(SchedulerMisuse, match="permutation"):
        s.rebuild([0, 0])
