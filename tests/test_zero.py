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
from moecore.distributed.zero.forward_hooks import add_forward_hook
from moecore.distributed.zero.shards import owned_range, reduce_scatter_counts
from moecore.train import ConfigError, build_config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"zero": 4}, "zero must be 0, 1, 2 or 3, got 4"),
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


def test_config_accepts_compression_with_stage_1_and_stage_3_with_expert_parallelism():
    assert build_config("moe-tiny", overrides={"zero": 1, "compress": "topk:0.1"}).zero == 1
    assert build_config("moe-tiny", overrides={"zero": 3, "ep": 2, "dp": 2}).zero == 3


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


def test_stage3_buckets_never_span_two_gather_units():
    """Each block's parameters fill buckets of their own (so each rank owns an even part
    of every block and gathers are balanced), where stage 2 packs them together."""
    from moecore.models import MoETransformer
    from moecore.models.config import ModelConfig

    def model():
        mc.manual_seed(0)
        return MoETransformer(ModelConfig.from_run(build_config("moe-tiny")))

    def unit_of(name):  # the root, or "blocks.i"
        head = name.split(".")[:2]
        return ".".join(head) if head[0] == "blocks" else "root"

    packed = ZeRO(model(), SingleProcess(), stage=2)
    mixed = [{unit_of(packed.names[g]) for g, _, _ in b.slices} for b in packed.buckets]
    assert max(len(u) for u in mixed) > 1  # the default 25 MiB buckets hold several
    split = ZeRO(model(), SingleProcess(), stage=3)
    per_bucket = [{unit_of(split.names[g]) for g, _, _ in b.slices} for b in split.buckets]
    assert all(len(u) == 1 for u in per_bucket), per_bucket
    blocks = {u for us in per_bucket for u in us} - {"root"}
    assert len(blocks) == build_config("moe-tiny").n_layers


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


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("first", [0, 1])
def test_forward_hooks_nest_and_removing_them_in_any_order_restores_forward(first):
    """Two owners hook one module (stage 3's ZeROs of the replicated parameters and of the
    experts): the hook added last wraps the other; removing them in either order leaves
    exactly what was there before — the class's forward, or an instance forward set by
    someone else."""
    events = []
    for previous in (None, lambda x: 3 * x):
        module = _Double()
        if previous is not None:
            object.__setattr__(module, "forward", previous)
        before = dict(module.__dict__)
        removers = [
            add_forward_hook(
                module,
                lambda name=name: events.append(f"{name} before"),
                lambda out, name=name: events.append(f"{name} after {out}"),
            )
            for name in ("a", "b")
        ]
        events.clear()
        assert module(1) == (2 if previous is None else 3)
        out = 2 if previous is None else 3
        assert events == ["b before", "a before", f"a after {out}", f"b after {out}"]
        removers[first]()
        events.clear()
        assert module(1) == out
        left = "ab"[1 - first]
        assert events == [f"{left} before", f"{left} after {out}"]
        removers[first]()  # removing twice is harmless
        removers[1 - first]()
        assert module.__dict__ == before
        events.clear()
        assert module(1) == out and events == []


class _Subset:
    def __init__(self, named):
        self._named = named

    def named_parameters(self):
        return list(self._named)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        mc.manual_seed(5)
        self.emb = nn.Linear(6, 5)
        self.blocks = nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 5)])
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.emb(x)
        for block in self.blocks:
            h = block(h).tanh() + h
        return (self.head(h) * self.head(h)).mean()


def _split(model):
    """The blocks' biases (as experts would be: inside blocks only) and the rest."""
    named = list(model.named_parameters())
    chosen = {n for n, _ in named if n.startswith("blocks.") and n.endswith(".bias")}
    return [(n, p) for n, p in named if n not in chosen], [(n, p) for n, p in named if n in chosen]


@pytest.mark.parametrize("order", ["outer-first", "inner-first"])
def test_two_stage3_zeros_over_parts_of_one_module_equal_adamw(order):
    """Stage 3 as with expert parallelism, in one process: two ZeROs over disjoint parts
    of one model (``module=`` the model) hook the same blocks; each gathers only its own
    parameters (a block with none of them is no unit; the root may be empty). Three steps
    equal plain AdamW's; removing the hooks in either order leaves the parameters whole
    and the model's own forward."""
    rng = np.random.default_rng(1)
    xs = [mc.Tensor(rng.standard_normal((4, 6)).astype(np.float32)) for _ in range(3)]
    ref, got = _Stack(), _Stack()
    ref_opt = optim.AdamW(ref.parameters(), lr=1e-2)
    dense, inner = _split(got)
    zeros = [
        ZeRO(_Subset(dense), SingleProcess(), stage=3, module=got),
        ZeRO(_Subset(inner), SingleProcess(), stage=3, module=got),
    ]
    labels = [[u.label for u in z.sharded.units] for z in zeros]
    assert labels == [["root", "blocks.0", "blocks.1"]] * 2
    assert zeros[1].sharded.units[0].params == []
    opt = ShardedOptimizer(optim.AdamW(got.parameters(), lr=1e-2), zeros)
    for x in xs:
        ref(x).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        got(x).backward()
        for z in zeros:
            z.finish()
        opt.step()
        opt.zero_grad()
        assert not any(p.data.any() for p in got.parameters())  # freed between steps
    for z in zeros if order == "inner-first" else zeros[::-1]:
        z.remove_hooks()
    assert "forward" not in got.__dict__
    assert not any("forward" in block.__dict__ for block in got.blocks)
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        np.testing.assert_array_equal(b.data, a.data, err_msg=name)


def test_stage3_refuses_parameters_outside_its_module_and_module_without_stage_3():
    model, other = _Stack(), _Stack()
    with pytest.raises(ValueError, match="not in the module whose blocks define"):
        ZeRO(_Subset(list(other.named_parameters())), SingleProcess(), stage=3, module=model)
    with pytest.raises(ValueError, match="module= is for stage 3"):
        ZeRO(model, SingleProcess(), stage=2, module=model)
    with pytest.raises(TypeError, match="or module= the model"):
        ZeRO(_Subset(list(model.named_parameters())), SingleProcess(), stage=3)


def test_released_memory_reads_zero_and_refaulting_costs_are_measured():
    from moecore.distributed.zero.memory import anonymous, refault_cost, release

    memory, view = anonymous(3 * 1000 * 4)
    assert view.shape == (3000,) and view.dtype == np.float32
    view[...] = np.arange(3000, dtype=np.float32)
    release(memory, view)
    np.testing.assert_array_equal(view, np.zeros(3000, np.float32))
    view[::7] = 1.5  # written again after the release: the values are the new ones
    assert view.sum() == pytest.approx(1.5 * len(range(0, 3000, 7)))
    cost = refault_cost(1 << 22, repeat=3)
    assert np.isfinite(cost) and cost >= 0.0
    for bad in (-4, 6, 2.0, True):
        with pytest.raises(ValueError, match="nbytes must be a non-negative int, a multiple of 4"):
            anonymous(bad)
    with pytest.raises(ValueError, match="nbytes must be > 0"):
        refault_cost(0)
    with pytest.raises(ValueError, match="repeat must be an int >= 1"):
        refault_cost(4096, repeat=0)
