"""The harness that proves N-rank runs equal their reference (``parallel_harness.py``) and the
checksums it reads: it must fail, naming the step and quantity, when a run is off."""

import copy
import io
import os
from pathlib import Path

import numpy as np
import pytest
from parallel_harness import Tolerance, assert_runs_agree

from moecore.distributed import SingleProcess
from moecore.train import Trainer, build_config
from moecore.train.checksum import param_checksums
from moecore.train.metrics import read_metrics
from moecore.train.parallel import Layout
from moecore.train.trainer import build_model

TOL = Tolerance("test", loss=1e-6, grad_norm=1e-6, params=1e-6)


def records():
    sums = {"w": [3.0, 25.0], "b": [0.0, 0.0]}
    return [
        {"step": s, "loss": 5.0 - s, "grad_norm": 2.0, "param_checksum": copy.deepcopy(sums)}
        for s in (1, 2, 3)
    ]


def test_param_checksums_are_float64_sums_of_every_tensor():
    config = build_config("moe-tiny", overrides={"bias_update_rate": 0.01})
    model = build_model(config)
    got = param_checksums(model, Layout(SingleProcess(), 1))
    state = model.state_dict()
    assert list(got) == list(state) and "blocks.0.ffn.expert_bias" in got
    for name, value in state.items():
        v = np.asarray(value, np.float64)
        np.testing.assert_allclose(got[name], [v.sum(), (v * v).sum()], rtol=1e-12, err_msg=name)


def test_identical_runs_agree_and_the_largest_differences_are_reported():
    ref, got = records(), records()
    got[1]["loss"] += 5e-7
    assert assert_runs_agree(ref, got, TOL) == {
        "loss": pytest.approx(5e-7),
        "grad_norm": 0.0,
        "params": 0.0,
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(loss=r["loss"] + 1e-5), "step 2: loss differs by 1e-05"),
        (lambda r: r.update(grad_norm=2.0 * (1 + 1e-5)), "step 2: grad_norm differs by 1e-05"),
        (
            lambda r: r["param_checksum"]["w"].__setitem__(0, 3.0 + 5e-5),
            "step 2: Σ w differs by 1e-05",
        ),
        (lambda r: r["param_checksum"]["w"].__setitem__(1, 25.0 * (1 + 1e-5)), "step 2: Σ² w"),
        (lambda r: r["param_checksum"]["b"].__setitem__(0, 1e-5), "step 2: Σ b differs by 1e-05"),
        (lambda r: r.update(loss=float("nan")), "step 2: loss differs by nan"),
    ],
)
def test_the_first_step_and_quantity_that_differ_are_named(change, message):
    ref, got = records(), records()
    change(got[1])
    change(got[2])
    with pytest.raises(AssertionError, match="^" + message.replace("(", r"\(")) as err:
        assert_runs_agree(ref, got, TOL)
    assert "tolerance 'test'" in str(err.value)


def test_runs_of_other_lengths_or_tensors_are_refused():
    with pytest.raises(AssertionError, match="2 steps, the reference has 3"):
        assert_runs_agree(records(), records()[:2], TOL)
    got = records()
    del got[0]["param_checksum"]["b"]
    with pytest.raises(AssertionError, match="different tensors"):
        assert_runs_agree(records(), got, TOL)


def test_the_trainer_writes_checksums_only_when_asked(tmp_path):
    root = Path(os.__file__).parent
    data = tmp_path / "corpus.txt"
    data.write_bytes(b"".join(p.read_bytes() for p in sorted(root.glob("[a-c]*.py")))[:100_000])
    base = dict(data=str(data), steps=2, eval_every=0, checkpoint_every=0, seq_len=16)
    for on in (False, True):
        out = tmp_path / str(on)
        trainer = Trainer(
            build_config("moe-tiny", overrides={**base, "param_checksum": on}),
            out,
            out=io.StringIO(),
        )
        trainer.train()
        recs = read_metrics(out / "metrics.jsonl")
        assert all(("param_checksum" in r) == on for r in recs), recs
    want = param_checksums(trainer.model, trainer.layout)  # the final parameters
    assert recs[-1]["param_checksum"] == want
