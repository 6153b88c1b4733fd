"""Process groups in one process: launcher detection (mpi4py never imported without one),
``SingleProcess`` semantics, ``DataParallel`` over one process, argument errors."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import moecore as mc
import moecore.distributed as dist
from moecore import nn, ops
from moecore.compress import TopK


def test_launcher_detection_from_env():
    assert dist.world_size_from_env({}) is None
    assert not dist.launched_by_mpi({})
    assert dist.world_size_from_env({"PMI_SIZE": "4", "PMI_RANK": "1"}) == 4
    assert dist.world_size_from_env({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert dist.launched_by_mpi({"PMIX_RANK": "0"})
    with pytest.raises(ValueError, match="PMI_SIZE"):
        dist.world_size_from_env({"PMI_SIZE": "four"})


def test_init_without_launcher_never_imports_mpi4py():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PMI", "PMIX", "OMPI_", "MV2_", "MPI_"))
    }
    code = (
        "import sys, moecore.distributed as d; g = d.init(); "
        "assert type(g).__name__ == 'SingleProcess', g; "
        "assert 'mpi4py' not in sys.modules; print('fine')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "fine" in out.stdout, out.stderr


def test_init_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        dist.init("gloo")


def test_single_process_collectives():
    g = dist.SingleProcess()
    a = np.arange(4, dtype=np.float32)
    assert g.allreduce(a) is a and a.tolist() == [0, 1, 2, 3]
    done = []
    r = g.iallreduce(a, on_done=lambda: done.append(1))
    assert r.test() and done == [1]
    recv = np.empty((1, 4), np.float32)
    g.allgather(a, recv)
    assert recv[0].tolist() == a.tolist()
    parts = g.allgatherv(np.array([5, 6], np.uint8))
    assert [p.tolist() for p in parts] == [[5, 6]]
    rows, counts = g.alltoallv(np.ones((3, 2), np.float32), [3])
    assert rows.shape == (3, 2) and counts.tolist() == [3]
    with pytest.raises(ValueError, match="send_counts"):
        g.alltoallv(np.ones((3, 2), np.float32), [2])
    with pytest.raises(ValueError, match="root"):
        g.broadcast(a, root=1)
    with pytest.raises(ValueError, match="op"):
        g.allreduce(a, op="prod")
    with pytest.raises(ValueError, match="C-contiguous"):
        g.allreduce(np.ones((4, 4), np.float32)[:, 0])
    with pytest.raises(TypeError, match="numpy"):
        g.allreduce([1.0])
    assert g.split(0).size == 1
    g.barrier()


class Tiny(nn.Module):
    def __init__(self, d_in=3, hidden=4, d_out=2):
        super().__init__()
        self.a = nn.Linear(d_in, hidden)
        self.b = nn.Linear(hidden, d_out)

    def forward(self, x):
        y = self.b(self.a(x))
        return ops.mean(y * y)


def test_data_parallel_single_process_keeps_gradients():
    mc.manual_seed(0)
    m = Tiny()
    dp = dist.DataParallel(m, dist.SingleProcess(), compress="topk:0.5")
    x = mc.tensor(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))
    dp(x).backward()
    before = {n: p.grad.copy() for n, p in m.named_parameters()}
    dp.finish()
    for n, p in m.named_parameters():
        np.testing.assert_array_equal(p.grad, before[n])
    # Parameters registered nearest the input come first and get the lower layers.
    assert [b.layer for b in dp.buckets] == [0]
    assert isinstance(dp.compressor, TopK) and dp.compressor.ratio == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(aux_loss=0.05, z_loss=0.01, n_shared_experts=1),
        dict(score="sigmoid", n_groups=2, topk_groups=1, aux_loss=0.05, bias_update_rate=0.01),
        dict(activation="swiglu", aux_loss=0.0),
    ],
)
def test_expert_parallel_layer_over_one_process_is_the_moe_layer(kwargs):
    """On a group of one, the expert-parallel layer (its exchange and statistics all-reduce
    included) is the ``nn.MoE`` it was cut from: outputs equal to the bit, aux loss and
    gradients to float rounding (its Switch statistics are summed in float64), the same
    state-dict names, the scale copied, the same bias update."""
    from moecore.distributed.expert_parallel import ExpertParallelMoE

    mc.manual_seed(3)
    full = nn.MoE(8, 6, n_experts=4, top_k=2, **kwargs)
    full.aux_loss_scale = 0.5
    layer = ExpertParallelMoE.from_moe(full, dist.SingleProcess())
    assert isinstance(layer, nn.MoE) and layer.aux_loss_scale == 0.5
    assert list(layer.state_dict()) == list(full.state_dict())
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((2, 7, 8)).astype(np.float32)
    c = mc.tensor(rng.standard_normal((2, 7, 8)).astype(np.float32))
    outputs = []
    for m in (full, layer):
        x = mc.tensor(xs, requires_grad=True)
        y = m(x)
        (y * c).sum().backward()
        outputs.append((y.data, x.grad, m.last_stats))
    np.testing.assert_array_equal(outputs[1][0], outputs[0][0])
    np.testing.assert_allclose(outputs[1][1], outputs[0][1], rtol=1e-5, atol=1e-7)
    for key in ("aux_loss", "z_loss", "router_entropy"):
        assert outputs[1][2][key] == pytest.approx(outputs[0][2][key], rel=1e-6), key
    np.testing.assert_array_equal(
        outputs[1][2]["tokens_per_expert"], outputs[0][2]["tokens_per_expert"]
    )
    grads = dict(full.named_parameters())
    for name, p in layer.named_parameters():
        np.testing.assert_allclose(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, err_msg=name)
    full.update_bias()
    layer.update_bias()
    np.testing.assert_array_equal(layer.expert_bias, full.expert_bias)
    with pytest.raises(ValueError, match="already sharded"):
        ExpertParallelMoE.from_moe(layer, dist.SingleProcess())


def test_moe_op_refuses_capacity_dropping_with_an_exchange():
    from moecore.distributed.expert_parallel import ExpertParallelMoE

    layer = ExpertParallelMoE.from_moe(nn.MoE(8, 6, n_experts=4), dist.SingleProcess())
    args = (mc.randn(5, 8), layer.router, layer.w1, layer.w2)
    with pytest.raises(ValueError, match="capacity_factor with an exchange"):
        ops.moe(*args, capacity_factor=1.0, exchange=layer.exchange)


@pytest.mark.parametrize(
    "spec, err, match",
    [
        ("topk:abc", ValueError, "topk"),
        ("gzip", ValueError, "topk"),
        ("topk:2", ValueError, "ratio"),
        (3, TypeError, "compress"),
    ],
)
def test_parse_compress_errors(spec, err, match):
    with pytest.raises(err, match=match):
        dist.parse_compress(spec)


def test_parse_compress():
    assert dist.parse_compress(None) is None
    assert dist.parse_compress("none") is None
    c = dist.parse_compress("topk:0.01")
    assert c.ratio == 0.01 and c.error_feedback


class _GroupOf:
    """A stand-in group whose all-gather returns what the other ranks would have sent."""

    def __init__(self, parts):
        self.size = len(parts)
        self.parts = parts

    def allgatherv(self, send):
        return [send if p is None else p for p in self.parts]


def _described(entries, settings=None):
    import json

    blob = {"parameters": entries, "settings": settings or {}}
    return np.frombuffer(json.dumps(blob).encode(), dtype=np.uint8)


def test_check_ranks_agree_names_a_missing_trailing_parameter():
    from moecore.distributed.agreement import check_ranks_agree

    p = nn.Linear(3, 2)
    named = list(p.named_parameters())  # weight [2, 3], bias [2]
    # Rank 1 has the weight only: the lists agree up to where rank 1's ends.
    only_weight = _described([["weight", [2, 3], "float32"]])
    with pytest.raises(ValueError) as err:
        check_ranks_agree(_GroupOf([None, only_weight]), "DataParallel", named)
    assert str(err.value) == (
        "DataParallel: the ranks' models differ, so their gradients cannot be averaged: "
        "rank 0 has 2 parameters and rank 1 has 1; the first one only rank 0 has is "
        "'bias' of shape [2] float32"
    )
    # Rank 2 has the same two: accepted; a dtype difference is named.
    same = _described([["weight", [2, 3], "float32"], ["bias", [2], "float32"]])
    check_ranks_agree(_GroupOf([None, same, same]), "DataParallel", named)
    f64 = _described([["weight", [2, 3], "float32"], ["bias", [2], "float64"]])
    with pytest.raises(
        ValueError,
        match=r"parameter 1 is 'bias' of shape \[2\] float32 on rank 0 "
        r"but 'bias' of shape \[2\] float64 on rank 2",
    ):
        check_ranks_agree(_GroupOf([None, same, f64]), "DataParallel", named)


def test_check_ranks_agree_names_the_first_setting_that_differs():
    from moecore.distributed.agreement import check_ranks_agree

    named = list(nn.Linear(3, 2).named_parameters())
    params = [["weight", [2, 3], "float32"], ["bias", [2], "float32"]]
    mine = {"bucket_mb": 25, "compress": {"ratio": 0.01, "values": "f32"}}
    same = _described(params, {"compress": {"values": "f32", "ratio": 0.01}, "bucket_mb": 25})
    check_ranks_agree(_GroupOf([None, same]), "DataParallel", named, mine)
    other = _described(params, {"bucket_mb": 25, "compress": None})
    with pytest.raises(ValueError) as err:
        check_ranks_agree(_GroupOf([None, same, other]), "DataParallel", named, mine)
    assert str(err.value) == (
        "DataParallel: the ranks' settings differ, so their collectives would not match: "
        "compress is {'ratio': 0.01, 'values': 'f32'} on rank 0 but None on rank 2"
    )
    # A setting only one side has is a difference too.
    extra = _described(params, {**mine, "credit_mb": 16})
    with pytest.raises(ValueError, match="credit_mb is None on rank 0 but 16 on rank 1"):
        check_ranks_agree(_GroupOf([None, extra]), "DataParallel", named, mine)


def test_watchdog_fires_only_for_a_wait_past_its_deadline():
    import threading
    import time

    from moecore.distributed.watchdog import PERIOD, Watchdog

    fired = []
    got = threading.Event()
    dog = Watchdog(lambda message: (fired.append(message), got.set()))
    with dog.watch(None, "never armed", "nowhere"):
        time.sleep(2 * PERIOD)
    with dog.watch(5.0, "quick", "nowhere"):
        time.sleep(2 * PERIOD)  # done well within its limit
    time.sleep(2 * PERIOD)
    assert fired == []
    # Nested waits: the inner one ending must not disarm the outer one, which then fires
    # with its own message (a single armed slot used to be cleared by the inner exit).
    with dog.watch(0.6, "operation 7 (bucket 2)", "DataParallel(timeout=...)"):
        with dog.watch(30.0, "waiting for an all-reduce", "the group's timeout"):
            pass
        assert got.wait(20 * PERIOD)
    dog.close()
    assert fired == [
        "operation 7 (bucket 2) did not complete within 0.6 s: another rank is stuck or "
        "gone; ending the job (the limit is DataParallel(timeout=...))"
    ]


def test_watchdog_fires_for_the_earliest_deadline_of_nested_waits():
    import threading

    from moecore.distributed.watchdog import PERIOD, Watchdog

    fired = []
    got = threading.Event()
    dog = Watchdog(lambda message: (fired.append(message), got.set()))
    with dog.watch(60.0, "outer", "a"), dog.watch(0.1, "inner", "b"):
        assert got.wait(10 * PERIOD)
    dog.close()
    assert len(fired) == 1 and fired[0].startswith("inner did not complete within 0.1 s")


def test_a_group_of_one_never_arms_its_watchdog():
    group = dist.SingleProcess()
    group.timeout = 1e-9
    with group.watch("nothing to wait for"):
        pass
    assert group._watchdog is None


@pytest.mark.parametrize("timeout", [0, -1.0, "10", True])
def test_init_and_watch_reject_a_bad_timeout(timeout):
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0 or None"):
        dist.init("single", timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0 or None"):
        dist.SingleProcess().watch("a wait", timeout=timeout)


@pytest.mark.parametrize("timeout", [0, -1.0, "10"])
def test_data_parallel_rejects_a_bad_timeout(timeout):
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0 or None"):
        dist.DataParallel(nn.Linear(2, 2), dist.SingleProcess(), timeout=timeout)


class _SlowPair(dist.SingleProcess):
    """Rank 0 of a stand-in pair whose partner has the same gradients: every all-reduce
    doubles its buffer, after ``delay`` seconds spent in the wait (a slow link)."""

    def __init__(self, delay):
        super().__init__()
        self.size = 2
        self.delay = delay

    def allgatherv(self, send):
        return [send, send]

    def broadcast(self, buf, root=0):
        return buf

    def iallreduce(self, buf, op="sum", on_done=None):
        group = self

        class Slow(dist.Request):
            def test(self):
                return False

            def wait(self):
                time.sleep(group.delay)
                np.multiply(buf, 2, out=buf)
                self._complete()

        return Slow(on_done)


@pytest.mark.parametrize("policy", ["fifo", "priority"])
def test_backward_wait_seconds_counts_only_waits_for_credit(policy):
    # Gradients of 16 KiB or less; priority with a 16 KiB credit must wait for the oldest
    # all-reduce before each later launch, inside backward; fifo never waits there.
    mc.manual_seed(0)
    m = Tiny(64, 64, 64)
    kb = 1 / 1024
    dp = dist.DataParallel(
        m,
        _SlowPair(0.02),
        bucket_mb=16 * kb,
        first_bucket_mb=16 * kb,
        policy=policy,
        partition_mb=16 * kb,
        credit_mb=16 * kb,
    )
    x = mc.tensor(np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32))
    dp(x).backward()
    expected = {n: p.grad.copy() for n, p in m.named_parameters()}
    stats = dp.finish()
    for n, p in m.named_parameters():
        np.testing.assert_allclose(p.grad, expected[n], rtol=1e-6)  # (g + g) / 2
    held = stats["backward_wait_seconds"]
    launched = stats["launched_in_backward"]
    assert launched >= 2
    if policy == "fifo":
        assert held == 0.0
    else:
        # Every launch but the first waited for the one before it: 0.02 s each.
        assert held >= 0.02 * (launched - 1) * 0.9


def test_moecore_dist_is_an_alias_of_moecore_distributed():
    """The former name gives the very same objects (one class per name), also when it is the
    first one imported in a process."""
    import moecore.dist as old
    import moecore.dist.mpi as old_mpi
    from moecore.dist.launch import mpi_family

    assert old.DataParallel is dist.DataParallel and old.init is dist.init
    assert old_mpi is sys.modules["moecore.distributed.mpi"]
    assert mpi_family is sys.modules["moecore.distributed.launch"].mpi_family
    code = (
        "import sys; import moecore.dist.data_parallel as a; "
        "import moecore.distributed.data_parallel as b; "
        "assert a is b and a.DataParallel is sys.modules['moecore.dist'].DataParallel"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
