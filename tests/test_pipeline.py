"""Pipeline schedules from Python, the mesh's rank order, the stage cut, and the engine in
one process (a 1-rank pipeline cut into stages against plain gradient accumulation)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moecore.distributed import SingleProcess
from moecore.distributed.mesh import Mesh
from moecore.distributed.pipeline import KINDS, PipelineEngine, schedule, simulate
from moecore.errors import SchedulerMisuse
from moecore.models import ModelConfig, MoETransformer
from moecore.train.pipeline import balance_stages


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("m", [4, 8, 16])
def test_simulated_bubbles_match_the_theory(p, m):
    """Megatron-LM §2.2: (p−1)/(m+p−1) for GPipe and 1F1B, (p−1)/(v·m+p−1) interleaved."""
    f, b = [1.0] * p, [2.0] * p
    for kind in ("gpipe", "1f1b"):
        assert simulate(kind, p, m, f, b)["bubble"] == pytest.approx((p - 1) / (m + p - 1))
    v = 2
    fv, bv = [0.5] * (p * v), [1.0] * (p * v)
    r = simulate("interleaved", p, m, fv, bv, virtual_stages=v)
    assert r["bubble"] == pytest.approx((p - 1) / (v * m + p - 1))


def test_schedule_steps_match_each_other_across_ranks():
    """Every send has its receive on the peer (checked here independently of Rust)."""
    for kind, p, m in [("gpipe", 3, 5), ("1f1b", 4, 6), ("interleaved", 2, 4), ("dualpipe", 4, 8)]:
        s = schedule(kind, p, m, virtual_stages=2)
        sends = {
            (r, st.peer, st.pass_, st.mb, st.where)
            for r in range(p)
            for st in s.steps[r]
            if st.kind == "send"
        }
        recvs = {
            (st.peer, r, st.pass_, st.mb, st.where)
            for r in range(p)
            for st in s.steps[r]
            if st.kind == "recv"
        }
        assert sends == recvs, kind
        computes = [st for r in range(p) for st in s.steps[r] if st.kind == "compute"]
        assert len(computes) == 2 * m * s.stages
        tags = {s.tag(st[2], st[3], st[4]) for st in sends}
        assert len(tags) == len(sends)


def test_one_f_one_b_keeps_at_most_p_alive_by_counting_the_steps():
    p, m = 4, 12
    s = schedule("1f1b", p, m)
    for r in range(p):
        alive = peak = 0
        for st in s.steps[r]:
            if st.kind == "compute":
                alive += 1 if st.pass_ == "forward" else -1
                peak = max(peak, alive)
        assert peak == p - r


def test_bad_schedules_are_refused():
    with pytest.raises(SchedulerMisuse, match="schedule must be"):
        schedule("zb", 2, 4)
    with pytest.raises(SchedulerMisuse, match="even number of ranks"):
        schedule("dualpipe", 3, 6)
    with pytest.raises(SchedulerMisuse, match="multiple of the pipeline ranks"):
        schedule("interleaved", 4, 6, virtual_stages=2)
    assert set(KINDS) == {"gpipe", "1f1b", "interleaved", "dualpipe"}


class _FakeGroup:
    """Enough of a Group for Mesh's arithmetic: rank, size, and split recording colours."""

    def __init__(self, rank, size):
        self.rank, self.size, self.splits = rank, size, []

    def split(self, color, key=None):
        self.splits.append((color, key))
        return (color, key)


def test_mesh_rank_order_is_row_major_and_groups_vary_one_dimension():
    world = 8
    colours: dict[str, dict[int, list[int]]] = {"pp": {}, "dp": {}, "ep": {}}
    for rank in range(world):
        g = _FakeGroup(rank, world)
        mesh = Mesh(g, pp=2, dp=2, ep=2)
        assert mesh.coords == {"pp": rank // 4, "dp": (rank // 2) % 2, "ep": rank % 2}
        assert mesh.rank_of(**mesh.coords) == rank
        for name, (color, key) in zip(mesh.names, g.splits):
            assert key == mesh.coords[name]
            colours[name].setdefault(color, []).append(rank)
    # The ranks of one group differ along that dimension only.
    assert sorted(colours["ep"].values()) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(colours["dp"].values()) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(colours["pp"].values()) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match="has 6 ranks"):
        Mesh(_FakeGroup(0, 8), pp=3, dp=2)
    assert Mesh(SingleProcess(), pp=1, dp=1).group("dp").size == 1


def test_balance_stages_minimises_the_largest_stage_like_brute_force():
    rng = np.random.default_rng(0)
    for n, k in [(5, 2), (6, 3), (4, 4), (2, 4)]:
        costs = list(rng.uniform(0.1, 3.0, n))
        got = balance_stages(costs, k)
        assert got[0][0] == 0 and got[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got))
        worst = max(sum(costs[lo:hi]) for lo, hi in got)
        best = min(
            max(sum(costs[lo:hi]) for lo, hi in zip((0, *cuts), (*cuts, n)))
            for cuts in itertools.combinations_with_replacement(range(n + 1), k - 1)
        )
        assert worst == pytest.approx(best)
    assert balance_stages([1.0] * 4, 2) == [(0, 2), (2, 4)]


class _Stages:
    def __init__(self, model, bounds, batches):
        self.model, self.bounds, self.batches = model, bounds, batches

    def forward(self, stage, mb, x):
        ids, targets = self.batches[mb]
        lo, hi = self.bounds[stage]
        h = self.model.embed(ids) if stage == 0 else x
        h = self.model.run_blocks(h, lo, hi)
        return self.model.head(h, targets) if stage == len(self.bounds) - 1 else h


@pytest.mark.parametrize(
    ("kind", "v", "bounds"),
    [("gpipe", 1, [(0, 3)]), ("1f1b", 1, [(0, 3)]), ("interleaved", 3, [(0, 1), (1, 1), (1, 3)])],
)
def test_engine_on_one_rank_equals_gradient_accumulation(kind, v, bounds):
    """A 1-rank pipeline — with ``interleaved`` and 3 virtual stages, three chunks handing
    activations and gradients to each other inside the rank, one of them empty — gives
    the loss and gradients of ``(loss_mb / m).backward()`` summed over micro-batches."""
    cfg = ModelConfig(
        d_model=16, n_layers=3, n_heads=2, seq_len=8, vocab_size=32, n_experts=4, d_ff=16
    )
    rng = np.random.default_rng(1)
    m = 3
    batches = [(rng.integers(0, 32, (2, 8)), rng.integers(0, 32, (2, 8))) for _ in range(m)]
    ref = MoETransformer(cfg)
    ref_losses = []
    for x, y in batches:
        loss = ref(x, y)
        ref_losses.append(loss.item())
        (loss * (1.0 / m)).backward()
    model = MoETransformer(cfg)
    model.load_state_dict(ref.state_dict())
    s = schedule(kind, 1, m, virtual_stages=v)
    assert s.stages == len(bounds)
    engine = PipelineEngine(s, SingleProcess(), _Stages(model, bounds, batches), (2, 8, 16))
    losses = engine.run(loss_scale=1.0 / m)
    assert sorted(losses) == [(mb, pytest.approx(ref_losses[mb], rel=1e-6)) for mb in range(m)]
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        np.testing.assert_allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pp": 2, "pp_schedule": "zb"}, "pp_schedule must be one of"),
        ({"pp": 2, "pp_balance": "time"}, "pp_balance must be one of"),
        ({"pp": 0}, "pp must be ≥ 1"),
        ({"pp": 2, "pp_schedule": "interleaved", "grad_accum": 3}, "pp_schedule 'interleaved'"),
        ({"pp": 3, "pp_schedule": "dualpipe", "grad_accum": 6}, "pp_schedule 'dualpipe'"),
        ({"pp": 2, "pp_schedule": "dualpipe", "grad_accum": 2}, "pp_schedule 'dualpipe'"),
        ({"pp": 2, "dropout": 0.1}, "dropout"),
        ({"pp": 2, "zero": 1}, r"zero \(1\) with pp"),
        ({"pp": 2, "dtype": "bf16"}, "dtype 'bf16' with pp"),
        ({"pp": 2, "optimizer": "adafactor"}, "optimizer adafactor with pp"),
    ],
)
def test_bad_pipeline_settings_name_their_key(values, message):
    from moecore.train.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)
