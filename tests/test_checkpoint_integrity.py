"""Checkpoint integrity: every file's SHA-256 in the checkpoint's manifest; a flipped byte or a
truncated file is detected, the damaged checkpoint is set aside (never deleted) and the run
resumes from the newest intact one on the same curve; ``moecore verify`` and its exit codes;
older checkpoints without a manifest still load."""

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from moecore.cli import main
from moecore.train import CheckpointError, Trainer, build_config
from moecore.train import checkpoint as ckpt
from moecore.train.integrity import CheckpointDamaged
from moecore.train.metrics import read_metrics

TINY = {"steps": 20, "eval_every": 0, "checkpoint_every": 10, "seq_len": 32, "batch_size": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A 20-step moe-tiny run with checkpoints at steps 10 and 20 (copied per test)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = build_config("moe-tiny", overrides={**TINY, "data": str(corpus)})
    Trainer(config, out, out=io.StringIO()).train()
    return out


@pytest.fixture
def run(tmp_path, trained):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _flip_a_weight_byte(path: Path) -> None:
    """Flips one bit in the tensor data (past the header), as bit rot would."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + (len(data) - 8 - n) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _damage(run, how):
    model = run / "checkpoints" / "step_00000020" / "model.safetensors"
    if how == "flipped":
        _flip_a_weight_byte(model)
    else:
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return model


def test_manifest_lists_every_file_with_its_sha256(run):
    import hashlib

    folder = ckpt.latest(run)
    manifest = json.loads((folder / "manifest.json").read_text())
    names = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == names
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_damaged_latest_checkpoint_is_skipped_kept_and_resume_follows_the_curve(run, how, capsys):
    before = _losses(run)
    model = _damage(run, how)
    damaged_bytes = model.read_bytes()
    # The flipped byte still parses as weights: only the checksum tells.
    if how == "flipped":
        ckpt.safetensors.read(str(model))
    with pytest.raises(CheckpointDamaged, match=r"step_00000020/model\.safetensors"):
        ckpt.load(model.parent)
    trainer = Trainer.resume(run, out=io.StringIO(), overrides={"steps": 20})
    err = capsys.readouterr().err
    assert "step_00000020 is damaged" in err and "model.safetensors" in err, err
    assert ("SHA-256" if how == "flipped" else "truncated") in err, err
    assert trainer.step == 10
    trainer.train()
    # Never deleted: set aside under another name, its bytes as they were.
    kept = run / "checkpoints" / "step_00000020.damaged" / "model.safetensors"
    assert kept.read_bytes() == damaged_bytes
    records = read_metrics(run / "metrics.jsonl")
    events = [r for r in records if r.get("event") == "checkpoint_damaged"]
    assert len(events) == 1 and events[0]["checkpoint"] == "step_00000020", events
    assert (
        events[0]["resumed_from"] == "step_00000010" and "model.safetensors" in events[0]["problem"]
    )
    assert _losses(run) == before  # steps 11-20 again, bit-exact, from the intact weights
    assert [p.name for p in ckpt.checkpoint_dirs(run)][-1] == "step_00000020"
    ckpt.load(ckpt.latest(run))  # the new step 20 is intact


def test_eval_and_generate_use_the_newest_intact_checkpoint(run, capsys):
    assert main(["eval", "--run", str(run)]) == 0
    intact = json.loads(capsys.readouterr().out)
    _damage(run, "flipped")
    assert main(["eval", "--run", str(run)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 10 and intact["step"] == 20
    assert "step_00000020 is damaged" in captured.err
    assert main(["generate", "--run", str(run), "--tokens", "3", "--temperature", "0"]) == 0
    assert "step_00000020 is damaged" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000020").is_dir()  # reading changes nothing


def test_every_checkpoint_damaged_is_an_error_naming_each(run):
    _damage(run, "flipped")
    _flip_a_weight_byte(run / "checkpoints" / "step_00000010" / "optimizer.safetensors")
    with pytest.raises(
        CheckpointError, match=r"(?s)no intact checkpoint.*step_00000020.*step_00000010"
    ):
        Trainer.resume(run, out=io.StringIO())


def test_damaged_state_json_or_manifest_is_detected(run):
    folder = ckpt.latest(run)
    state = folder / "state.json"
    state.write_text(state.read_text().replace('"step": 20', '"step": 21'))
    with pytest.raises(CheckpointDamaged, match=r"state\.json"):
        ckpt.load(folder)
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointDamaged, match=r"manifest\.json: not a moecore manifest"):
        ckpt.load(folder)


def test_verify_exit_codes(run, tmp_path, capsys):
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == 2 and "2 intact, 0 damaged" in out, out
    _damage(run, "truncated")
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED   step_00000020" in out and "model.safetensors" in out, out
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 2


def test_checkpoints_without_a_manifest_still_load_with_a_note(run, capsys):
    for folder in ckpt.checkpoint_dirs(run):
        (folder / "manifest.json").unlink()
    notes: list[str] = []
    groups, state = ckpt.load(ckpt.latest(run), notes)
    assert state["step"] == 20 and "model" in groups
    assert len(notes) == 1 and "no checksums" in notes[0]
    Trainer.resume(run, out=io.StringIO())
    assert "loaded unverified" in capsys.readouterr().err
    assert main(["verify", str(run)]) == 0
    assert capsys.readouterr().out.count("UNVERIFIED") == 2
    reference = Trainer.resume(run, out=io.StringIO())
    np.testing.assert_array_equal(
        reference.model.state_dict()["tok_emb.weight"], groups["model"]["tok_emb.weight"]
    )
