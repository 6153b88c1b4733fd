"""Property-based fuzzing of the readers of what users hand moecore: safetensors files, a
checkpoint's manifest and state, and run configurations (TOML files and ``--set`` values).
Any input gives a value or the reader's documented exception (``SafetensorsError``,
``CheckpointError``, ``ConfigError``: all ``ValueError``) — never another exception, a hang
or a crash. Bounded for CI: fixed example counts, derandomized, no deadline per example
(the machine may be loaded) but a few seconds per test."""

import io
import json
import shutil
import string
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moecore.train import ConfigError, Trainer, build_config, safetensors
from moecore.train import checkpoint as ckpt
from moecore.train.config import RunConfig
from moecore.train.preflight import check_memory

#: Example counts are per test (below): each runs in a few seconds on one core.
FUZZ = settings(
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _read_bytes(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as fh:
        fh.write(data)
        fh.flush()
        try:
            tensors, _ = safetensors.read(fh.name)
        except safetensors.SafetensorsError:
            return
    assert all(isinstance(v, np.ndarray) for v in tensors.values())


@settings(FUZZ, max_examples=300)
@given(st.binary(max_size=512))
def test_safetensors_reader_any_bytes(data):
    _read_bytes(data)


ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F64", "I8", "U16", "BOOL", "X9"]) | JSON,
        "shape": st.lists(st.integers(-3, 2**40), max_size=4) | JSON,
        "data_offsets": st.lists(st.integers(-8, 2**40), min_size=0, max_size=3) | JSON,
    }
)


@settings(FUZZ, max_examples=200)
@given(
    st.dictionaries(st.text(max_size=6), ENTRY | JSON, max_size=4),
    st.binary(max_size=256),
    st.integers(-16, 16),
)
def test_safetensors_reader_structured_headers(header, body, length_skew):
    blob = json.dumps(header).encode()
    data = struct.pack("<Q", max(len(blob) + length_skew, 0)) + blob + body
    _read_bytes(data)


@st.composite
def consistent_entries(draw):
    """Headers whose offsets agree with dtype and shape (so the reader goes as far as
    building the arrays), shapes with negative and huge dimensions included."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 3))):
        code = draw(st.sampled_from(["F32", "F64", "I8", "U16", "BOOL"]))
        shape = draw(st.lists(st.integers(-2, 3) | st.sampled_from([2**31, 2**63 - 1]), max_size=3))
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        size = max(count, 0) * np.dtype(safetensors._DTYPES[code]).itemsize
        size = min(size, 64)
        header[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(JSON)
    return header, offset


@settings(FUZZ, max_examples=200)
@given(consistent_entries(), st.integers(-2, 2))
def test_safetensors_reader_consistent_headers(entries, extra):
    header, size = entries
    blob = json.dumps(header).encode()
    _read_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * max(size + extra, 0))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A real 1-step moe-tiny checkpoint (its files are then mutated per example)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "corpus.txt").write_bytes(bytes(range(32, 127)) * 2000)
    settings_ = {"steps": 1, "eval_every": 0, "seq_len": 16, "data": str(tmp / "corpus.txt")}
    Trainer(build_config("moe-tiny", overrides=settings_), tmp / "run", out=io.StringIO()).train()
    return ckpt.latest(tmp / "run")


def _load_mutated(source: Path, name: str, content: bytes, keep_manifest: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / source.name
        shutil.copytree(source, folder)
        (folder / name).write_bytes(content)
        if not keep_manifest:
            (folder / "manifest.json").unlink(missing_ok=True)
        try:
            ckpt.load(folder)
        except ckpt.CheckpointError:
            return


@settings(FUZZ, max_examples=100)
@given(st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()))
def test_manifest_reader_any_content(checkpoint_dir, content):
    _load_mutated(checkpoint_dir, "manifest.json", content, keep_manifest=True)


@settings(FUZZ, max_examples=100)
@given(
    st.binary(max_size=300)
    | JSON.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(
        st.sampled_from(["format_version", "step", "files", "config", "rng", "optimizer"]),
        JSON | st.just(1) | st.just(["model"]),
        max_size=6,
    ).map(lambda v: json.dumps(v).encode())
)
def test_state_reader_any_content(checkpoint_dir, content):
    _load_mutated(checkpoint_dir, "state.json", content, keep_manifest=False)


@settings(FUZZ, max_examples=60)
@given(st.sampled_from(["step", "optimizer", "schedule", "monitor", "rng", "metrics_offset"]), JSON)
@example("metrics_offset", float("inf"))
@example("metrics_offset", -5)
@example("metrics_offset", 2**70)
@example("step", 2**70)
@example("rng", [1, 2])
@example("optimizer", {"param_groups": [], "scalars": {"x": 1}})
def test_resume_with_any_value_in_the_state(checkpoint_dir, key, value):
    """What the trainer reads from a (manifest-less, older) state: any value of a key gives a
    trainer or a CheckpointError."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(checkpoint_dir.parent.parent, run)
        folder = ckpt.latest(run)
        state = json.loads((folder / "state.json").read_text())
        state[key] = value
        (folder / "state.json").write_text(json.dumps(state))
        (folder / "manifest.json").unlink()
        try:
            Trainer.resume(run, out=io.StringIO())
        except ckpt.CheckpointError:
            return


KEYS = sorted(RunConfig.__dataclass_fields__)


@settings(FUZZ, max_examples=300)
@given(st.text(alphabet=string.printable, max_size=200))
def test_config_parser_any_toml_text(text):
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as fh:
        fh.write(text)
        fh.flush()
        try:
            build_config("moe-tiny", fh.name)
        except ConfigError:
            return


@settings(FUZZ, max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(KEYS) | st.text(max_size=5),
        st.text(max_size=12) | st.integers(-(2**80), 2**80) | st.floats() | st.booleans() | JSON,
        max_size=5,
    )
)
@example({"d_model": str(10**200), "n_heads": "1"})
@example({"lr": 10**400, "warmup_steps": "1" * 5000})
def test_config_parser_any_values_and_memory_check(overrides):
    """Any --set values (as strings, as the CLI passes them) or TOML-typed values: a valid
    configuration (whose memory check then runs without error) or a ConfigError."""
    for values in ({k: str(v) for k, v in overrides.items()}, overrides):
        try:
            config = build_config("moe-tiny", overrides=values)
        except ConfigError:
            continue
        est, problem = check_memory(config)
        assert est.total > 0 and (problem is None or "exceeds" in problem)
