"""ZeRO in one process: the configuration it refuses, how buckets are cut into owned parts,
the reduce-scatter of a group of one, and the sharded optimizer's checks. (The runs on
several ranks are in tests/test_zero_mpi.py.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import moecore as mc
from moecore import nn, optim
from moecore.distributed import SingleProcess
from moecore.distributed.zero import ShardedOptimizer, ZeRO
from moecore.distributed.zero.shards import owned_range, reduce_scatter_counts
from moecore.train import ConfigError, build_config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"zero": 4}, "zero must be 0, 1, 2 or 3, got 4"),
        ({"zero": 3, "ep": 2}, "stage 3 gathers each block's parameters over one group"),
        ({"zero": -1}, "zero must be 0, 1, 2 or 3"),
        ({"zero": 2, "compress": "topk:0.1"}, "compression composes with zero=1 only"),
        ({"zero": 1, "optimizer": "adafactor"}, "factored second moment needs whole matrices"),
        ({"zero": 2, "agc": 0.01}, "adaptive clipping needs each unit's whole gradient"),
        ({"zero": 3, "dtype": "bf16"}, "stage 3 gathers the float32 masters"),
        ({"zero": 2, "dtype": "fp16"}, "the loss scaler unscales whole gradients"),
    ],
)
def test_config_refuses_what_zero_cannot_do(values, message):
    with pytest.raises(ConfigError, match="zero") as info:
        build_config("moe-tiny", overrides=values)
    assert message in str(info.value)


def test_config_accepts_compression_with_stage_1():
    assert build_config("moe-tiny", overrides={"zero": 1, "compress": "topk:0.1"}).zero == 1


@given(st.integers(0, 10_000), st.integers(1, 9))
def test_owned_parts_partition_a_bucket(numel, world):
    parts = [owned_range(numel, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == numel
    for (a, b), (c, _) in itertools.pairwise(parts):
        assert a <= b == c
    assert max(b - a for a, b in parts) == -(-numel // world)


@given(st.integers(1, 5_000), st.integers(1, 9), st.data())
def test_reduce_scatter_counts_are_each_ranks_share_of_a_range(numel, world, data):
    lo = data.draw(st.integers(0, numel - 1))
    hi = data.draw(st.integers(lo + 1, numel))
    counts = reduce_scatter_counts(numel, lo, hi, world)
    assert sum(counts) == hi - lo
    for r, count in enumerate(counts):
        a, b = owned_range(numel, r, world)
        assert count == len(set(range(a, b)) & set(range(lo, hi)))


def test_reduce_scatter_of_a_group_of_one_is_a_copy():
    send = np.arange(5, dtype=np.float32)
    recv = np.zeros(5, dtype=np.float32)
    SingleProcess().ireduce_scatter(send, recv, [5]).wait()
    np.testing.assert_array_equal(recv, send)
    with pytest.raises(ValueError, match="recv must have shape"):
        SingleProcess().ireduce_scatter(send, np.zeros(4, np.float32), [5])


def _model():
    mc.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))


def test_zero_refuses_stages_it_does_not_have_and_compression_with_stage_2():
    with pytest.raises(ValueError, match="stage must be one of"):
        ZeRO(_model(), SingleProcess(), stage=4)
    with pytest.raises(ValueError, match="compression composes with stage 1 only"):
        ZeRO(_model(), SingleProcess(), stage=2, compress="topk:0.1")


def test_sharded_optimizer_refuses_adafactor():
    model = _model()
    zero = ZeRO(model, SingleProcess(), stage=1)
    with pytest.raises(ValueError, match="element-wise optimizer"):
        ShardedOptimizer(optim.Adafactor(model.parameters(), lr=1e-3, relative_step=False), [zero])


@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_optimizer_in_one_process_equals_adamw_and_round_trips_its_state(stage):
    """One rank owns every element: three steps equal plain AdamW's, and the state_dict is
    the plain optimizer's (same numbering, same arrays)."""
    rng = np.random.default_rng(0)
    x = mc.Tensor(rng.standard_normal((4, 6)).astype(np.float32))
    ref, got = _model(), _model()
    ref_opt = optim.AdamW(ref.parameters(), lr=1e-2)
    zero = ZeRO(got, SingleProcess(), stage=stage)
    got_opt = ShardedOptimizer(optim.AdamW(got.parameters(), lr=1e-2), [zero])
    for _ in range(3):
        ref(x).sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        zero(x).sum().backward()
        zero.finish()
        got_opt.step()
        got_opt.zero_grad()
    for a, b in zip(ref.parameters(), got.parameters()):
        np.testing.assert_array_equal(a.data, b.data)
    saved = got_opt.state_dict()
    want = ref_opt.state_dict()
    assert sorted(saved["state"]) == sorted(want["state"])
    for i, entry in want["state"].items():
        assert saved["state"][i]["step"] == entry["step"] == 3
        np.testing.assert_array_equal(saved["state"][i]["exp_avg_sq"], entry["exp_avg_sq"])
    fresh = ShardedOptimizer(optim.AdamW(got.parameters(), lr=1e-2), [zero])
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    for i, entry in saved["state"].items():
        np.testing.assert_array_equal(again["state"][i]["exp_avg"], entry["exp_avg"])
