"""Reading a sharded (ZeRO) checkpoint: the consolidated tensors equal the pieces that were
written, whether assembled at once or read lazily from the memory-mapped shards, and a
resuming ZeRO optimizer reads only its own pieces of the optimizer state (never the whole
arrays). The multi-rank resumes are in tests/test_zero_mpi.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import moecore as mc
from moecore import nn, optim
from moecore.distributed import SingleProcess
from moecore.distributed.zero import ShardedOptimizer, ZeRO
from moecore.distributed.zero.optimizer import _cut
from moecore.distributed.zero.shards import Piece
from moecore.train import checkpoint, safetensors
from moecore.train.integrity import CheckpointError
from moecore.train.sharded_checkpoint import Assembled, save_sharded

_SHAPES = {"a.weight": (5, 6), "b.weight": (3, 5)}


def _write(tmp_path, cuts, drop=None):
    """A sharded checkpoint whose pieces are the parameters cut at ``cuts[name]`` (as several
    ranks' parts would be), with an AdamW-like state per piece; returns (folder, whole
    parameters, whole exp_avg)."""
    rng = np.random.default_rng(1)
    whole = {n: rng.standard_normal(s).astype(np.float32) for n, s in _SHAPES.items()}
    avg = {n: rng.standard_normal(s).astype(np.float32) for n, s in _SHAPES.items()}
    owned = []
    for name, flat in whole.items():
        edges = [0, *cuts[name], flat.size]
        for lo, hi in itertools.pairwise(edges):
            if (name, lo) == drop:
                continue
            state = {"exp_avg": avg[name].reshape(-1)[lo:hi], "step": 4}
            owned.append((name, lo, flat.reshape(-1)[lo:hi], state))
    layout = {"world": 1, "params": [[n, list(s)] for n, s in _SHAPES.items()], "buffers": []}
    state = {"config": {}, "metrics_offset": 0, "optimizer": {"param_groups": []}}
    folder = save_sharded(tmp_path, 4, SingleProcess(), owned, layout, state, keep=2)
    return folder, whole, avg


def test_assembled_reads_ranges_and_rows_like_the_whole_array():
    full = np.arange(24, dtype=np.float32).reshape(6, 4)
    x = Assembled((6, 4))
    flat = full.reshape(-1)
    for lo, hi in [(0, 5), (5, 13), (13, 24)]:
        x.add(lo, flat[lo:hi])
    assert x.covered() == 24
    for lo, hi in [(0, 24), (3, 7), (5, 5), (12, 24), (20, 30)]:
        want = np.zeros(max(0, hi - lo), np.float32)
        want[: max(0, min(hi, 24) - lo)] = flat[lo:hi]
        np.testing.assert_array_equal(x.read(lo, hi), want)
    np.testing.assert_array_equal(x[1:4], full[1:4])
    np.testing.assert_array_equal(x[4:], full[4:])
    np.testing.assert_array_equal(np.asarray(x), full)
    np.testing.assert_array_equal(x[:, 1], full[:, 1])  # other indexing: the whole array's


@pytest.mark.parametrize("lazy", [False, True])
def test_consolidate_equals_the_pieces_written(tmp_path, lazy):
    folder, whole, avg = _write(tmp_path, {"a.weight": [7, 19], "b.weight": [1]})
    groups, state = checkpoint.load(folder, lazy=lazy)
    for i, name in enumerate(_SHAPES):
        got = groups["model"][name]
        assert isinstance(got, Assembled) == lazy
        np.testing.assert_array_equal(np.asarray(got), whole[name])
        np.testing.assert_array_equal(np.asarray(groups["optimizer"][f"{i}.exp_avg"]), avg[name])
        assert state["optimizer"]["scalars"][str(i)] == {"step": 4}


def test_a_missing_piece_is_a_gap_whether_read_lazily_or_not(tmp_path):
    folder, _, _ = _write(tmp_path, {"a.weight": [7, 19], "b.weight": [1]}, drop=("a.weight", 7))
    for lazy in (False, True):
        with pytest.raises(CheckpointError, match=r"do not cover parameters \['a.weight'\]"):
            checkpoint.load(folder, lazy=lazy)


def test_mapped_safetensors_are_read_only_views_equal_to_the_copies(tmp_path):
    tensors = {"x": np.arange(10, dtype=np.float32), "y": np.ones((2, 3), np.int64)}
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as fh:
        safetensors.write(fh, tensors)
    copied, _ = safetensors.read(str(path))
    mapped, _ = safetensors.read(str(path), mapped=True)
    for k in tensors:
        np.testing.assert_array_equal(mapped[k], copied[k])
        assert copied[k].flags.writeable and not mapped[k].flags.writeable


class _NoWhole(Assembled):
    """An :class:`Assembled` that counts the elements read and refuses to be read whole."""

    read_elements = 0

    def read(self, lo, hi):
        _NoWhole.read_elements += hi - lo
        return super().read(lo, hi)

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole array was read")


def _model():
    mc.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))


def test_a_zero_optimizer_loads_its_pieces_without_reading_whole_arrays():
    """AdamW state saved whole, loaded into a ZeRO optimizer from lazily read arrays: the
    state equals the saved one, and exactly each piece's elements were read."""
    rng = np.random.default_rng(2)
    model = _model()
    x = mc.Tensor(rng.standard_normal((4, 6)).astype(np.float32))
    plain = optim.AdamW(model.parameters(), lr=1e-2)
    model(x).sum().backward()
    plain.step()
    saved = plain.state_dict()
    lazy = {"param_groups": saved["param_groups"], "state": {}}
    for i, entry in saved["state"].items():
        lazy["state"][i] = {}
        for k, v in entry.items():
            if isinstance(v, np.ndarray):
                a = _NoWhole(v.shape)
                a.add(0, v)
                v = a
            lazy["state"][i][k] = v
    zero = ZeRO(model, SingleProcess(), stage=1)
    sharded = ShardedOptimizer(optim.AdamW(model.parameters(), lr=1e-2), [zero])
    _NoWhole.read_elements = 0
    sharded.load_state_dict(lazy)
    saved_arrays = [
        v for e in saved["state"].values() for v in e.values() if isinstance(v, np.ndarray)
    ]
    assert _NoWhole.read_elements == sum(v.size for v in saved_arrays)
    again = sharded.state_dict()
    for i, entry in saved["state"].items():
        for k, v in entry.items():
            np.testing.assert_array_equal(again["state"][i][k], v)


def test_a_zero_optimizer_refuses_state_of_the_wrong_size():
    model = _model()
    plain = optim.AdamW(model.parameters(), lr=1e-2)
    model(mc.Tensor(np.ones((1, 6), np.float32))).sum().backward()
    plain.step()
    saved = plain.state_dict()
    saved["state"][0]["exp_avg"] = np.zeros(3, np.float32)
    sharded = ShardedOptimizer(
        optim.AdamW(model.parameters(), lr=1e-2), [ZeRO(model, SingleProcess(), stage=1)]
    )
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter 0 has shape \(3,\)"):
        sharded.load_state_dict(saved)


def test_a_piece_is_cut_by_reading_its_elements_alone():
    """On several ranks a piece is part of a parameter: only its elements are read."""
    flat = np.arange(30, dtype=np.float32)
    whole = _NoWhole((5, 6))
    whole.add(0, flat[:11])
    whole.add(11, flat[11:])
    piece = Piece(index=0, bucket=0, lo=0, start=7, numel=9, tensor=None)
    _NoWhole.read_elements = 0
    np.testing.assert_array_equal(_cut(whole, piece), flat[7:16])
    assert _NoWhole.read_elements == 9
    np.testing.assert_array_equal(_cut(flat.reshape(5, 6), piece), flat[7:16])
