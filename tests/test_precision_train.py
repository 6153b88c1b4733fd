"""``dtype`` in the trainer: every format trains; checkpoints hold float32 masters and resume
in another dtype; fp16's loss scaler skips overflowed steps without counting them as bad."""

import io

import ml_dtypes
import numpy as np
import pytest

from moecore.train import ConfigError, Trainer, build_config
from moecore.train import checkpoint as ckpt
from moecore.train.metrics import read_metrics

TINY = {"steps": 8, "eval_every": 8, "checkpoint_every": 4, "seq_len": 32, "batch_size": 4}


def tiny(corpus, **extra):
    return build_config("moe-tiny", overrides={**TINY, "data": str(corpus), **extra})


def train(config, out):
    return Trainer(config, out, out=io.StringIO()).train()


def _not_bf16(a):
    return np.any(a.astype(ml_dtypes.bfloat16).astype(np.float32) != a)


@pytest.mark.parametrize("first, then", [("bf16", "float32"), ("float32", "bf16")])
def test_checkpoints_hold_float32_masters_and_resume_in_another_dtype(
    tmp_path, corpus, first, then
):
    run = tmp_path / "run"
    train(tiny(corpus, dtype=first, steps=4), run)
    _, groups, _state, _ = ckpt.newest_intact(run, [])
    # the masters, not the bf16 compute copies: float32 values bf16 cannot hold
    weights = [v for v in groups["model"].values() if v.ndim == 2]
    assert all(v.dtype == np.float32 for v in groups["model"].values())
    assert any(_not_bf16(v) for v in weights)
    assert all(v.dtype == np.float32 for v in groups["optimizer"].values())
    trainer = Trainer.resume(run, out=io.StringIO(), overrides={"dtype": then, "steps": 8})
    assert trainer.step == 4 and trainer.config.dtype == then
    params = dict(trainer.model.named_parameters())
    for name, saved in groups["model"].items():
        if name in params:
            np.testing.assert_array_equal(params[name].data, saved)
    result = trainer.train()
    assert result.steps_done == 8 and np.isfinite(result.val_loss)


def test_every_dtype_trains_close_to_float32(tmp_path, corpus):
    losses = {}
    for dtype in ("float32", "bf16", "fp16", "fp8"):
        result = train(tiny(corpus, dtype=dtype, steps=12, eval_every=12), tmp_path / dtype)
        losses[dtype] = result.val_loss
    for dtype in ("bf16", "fp16", "fp8"):
        assert losses[dtype] == pytest.approx(losses["float32"], rel=0.02), losses
    # the formats really round: the runs are not the float32 run
    assert len({losses[d] for d in losses}) > 1


def test_fp16_overflowed_steps_are_skipped_and_not_bad_steps(tmp_path, corpus):
    # 2²⁸ times the loss overflows fp16 in backward (the logits' gradient alone is up to
    # 2²⁸/128 tokens > 65504): the scale halves per skipped step until it fits. More steps in
    # a row than max_bad_steps: they must not count as bad steps.
    config = tiny(
        corpus,
        dtype="fp16",
        steps=14,
        loss_scale_init=2.0**28,
        max_bad_steps=2,
        param_checksum=True,
    )
    result = train(config, tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    overflowed = [r["step"] for r in records if r.get("overflow")]
    # the first steps overflow in a row, more than max_bad_steps of them, and the run goes on
    assert overflowed[: config.max_bad_steps + 1] == list(range(1, config.max_bad_steps + 2))
    assert len(overflowed) < len(records)
    scale = 2.0**28
    for prev, r in zip([None, *records], records):
        assert r["skipped"] == bool(r.get("overflow"))
        # an overflow halves the scale (and skips the step: the weights stay as they were);
        # a finite step keeps it (growth_interval is 2000)
        scale = scale / 2 if r.get("overflow") else scale
        assert r["loss_scale"] == scale
        if r.get("overflow") and prev is not None:
            assert r["param_checksum"] == prev["param_checksum"]
        if not r.get("overflow") and prev is not None:
            assert r["param_checksum"] != prev["param_checksum"]
    assert result.steps_done == 14 and np.isfinite(result.val_loss)


def test_bad_dtype_and_loss_scale_settings_name_the_key(corpus):
    with pytest.raises(ConfigError) as info:
        tiny(corpus, dtype="int8", loss_scale_init=0, loss_scale_growth_interval=0)
    msg = str(info.value)
    assert "dtype" in msg and "loss_scale_init" in msg and "loss_scale_growth_interval" in msg


def test_hpts_decides_each_sensitive_group_from_its_gradient_norm(tmp_path, corpus):
    from moecore.kernels.lowp import round_to
    from moecore.train.hpts import decide, sensitive_groups

    t = 0.1
    assert [decide(g, t) for g in (0.0, 0.049, 0.05, 0.099, 0.1, 7.0, float("nan"))] == [
        "fp16",
        "fp16",
        "bf16",
        "bf16",
        "float32",
        "float32",
        "float32",
    ]
    records = {}
    for name, threshold in (("huge", 1e9), ("tiny", 1e-9)):
        config = tiny(
            corpus, dtype="bf16", steps=3, precision_schedule="hpts", hpts_threshold=threshold
        )
        trainer = Trainer(config, tmp_path / name, out=io.StringIO())
        groups = sensitive_groups(trainer.model)
        assert sorted(groups) == [
            "blocks.0.residual",
            "blocks.0.router",
            "blocks.1.residual",
            "blocks.1.router",
        ]
        trainer.train()
        records[name] = read_metrics(tmp_path / name / "metrics.jsonl")
        # the next step's compute copies follow the last decision
        router = groups["blocks.0.router"][0]
        master = router.data
        with trainer.precision.compute():
            expected = round_to(master, np.float16) if name == "huge" else master
            np.testing.assert_array_equal(router.data, expected)
    # step 1 runs in float32 (no gradient yet); then every gradient norm is < 1e9 / 2 (fp16)
    # and ≥ 1e-9 (float32)
    for name, after in (("huge", "fp16"), ("tiny", "float32")):
        decisions = [r["hpts"] for r in records[name]]
        assert set(decisions[0].values()) == {"float32"}
        assert all(set(d.values()) == {after} for d in decisions[1:])
