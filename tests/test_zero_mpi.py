"""ZeRO stages 1 and 2 (``--zero N``) against plain data parallelism on the same ranks:
20 steps of moe-tiny, every step's loss, gradient norm and parameter checksums."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from parallel_harness import (
    Tolerance,
    assert_runs_agree,
    launch,
    mpiexec,
    read_records,
    train_run,
)
from parallel_harness import entry as _entry

pytestmark = [pytest.mark.mpi]

# The bound: 1e-5 relative on the loss and gradient-norm curves. The parameters
# are held to the same figure relative to each tensor's norm.
ZERO_TOL = Tolerance("ZeRO against plain data parallelism", loss=1e-5, grad_norm=1e-5, params=1e-5)
# Across world sizes the float32 summation order changes too: the parameter checksums of
# the smallest tensors (a norm's bias, ‖x‖ ~ 1e-3) move by up to 1.2e-5 of their norm
# (measured, 4 ranks against 2), as in tests/test_dist_mpi.py's ROUNDING (2e-5).
ACROSS_WORLDS = Tolerance("ZeRO across world sizes", loss=1e-5, grad_norm=1e-5, params=2e-5)
# As tests/test_dist_mpi.py's EXACT_SETS: eps keeps float32 noise below AdamW's step.
SETS = ["--set", "eps=1e-6"]


def _run(tmp_path, corpus, name, n, *extra, steps=20):
    args = ["--preset", "moe-tiny", "--data", str(corpus), "--set", f"steps={steps}"]
    args += ["eval_every=0", "checkpoint_every=0", "seq_len=32", "batch_size=8", *SETS[1:]]
    # The plain data-parallel curves are references: one run per configuration.
    records = train_run(tmp_path / name, n, [*args, *extra], reference=name == "plain")
    assert len(records) == steps
    return records


def _relative_loss(ref, got):
    return max(abs(g["loss"] - r["loss"]) / abs(r["loss"]) for r, g in zip(ref, got))


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_equals_plain_data_parallelism(tmp_path, corpus, n, stage):
    """Loss, gradient-norm and parameter curves of ``--zero stage`` on n ranks equal plain
    data parallelism's on the same n ranks within 1e-5 relative."""
    plain = _run(tmp_path, corpus, "plain", n, "--dp", str(n))
    zero = _run(tmp_path, corpus, "zero", n, "--dp", str(n), "--zero", str(stage))
    worst = assert_runs_agree(plain, zero, ZERO_TOL)
    print(f"zero={stage} n={n}: worst {worst}, loss relative {_relative_loss(plain, zero):.3g}")
    _assert_sharded(plain[-1], zero[-1], n, stage)


def test_stage3_with_multi_token_prediction_equals_plain_data_parallelism(tmp_path, corpus):
    """The MTP loss applies each MTP module's final norm after the module's forward, so
    stage 3 gathers those modules with the root: the curves equal plain DP's with MTP."""
    mtp = ["--set", "mtp_depth=1", "mtp_weight=0.3"]
    plain = _run(tmp_path, corpus, "plain", 2, "--dp", "2", *mtp)
    zero = _run(tmp_path, corpus, "zero", 2, "--dp", "2", "--zero", "3", *mtp)
    worst = assert_runs_agree(plain, zero, ZERO_TOL)
    print(f"zero=3 with MTP: worst {worst}, loss relative {_relative_loss(plain, zero):.3g}")
    _assert_sharded(plain[-1], zero[-1], 2, 3)


def _assert_sharded(plain, zero, n, stage):
    """Per-rank bytes (metrics.jsonl): plain DP holds everything on every rank; ZeRO's
    optimizer state (and with stage 2 the gradients) is cut in n parts that add up to
    plain's, none above 1/n (up to each bucket's rounding)."""
    sharded = ["rank_optimizer_bytes"] + (["rank_grad_bytes"] if stage >= 2 else [])
    sharded += ["rank_param_bytes"] if stage >= 3 else []
    for key in ("rank_param_bytes", "rank_grad_bytes", "rank_optimizer_bytes"):
        whole = plain[key]
        assert len(whole) == n and len(set(whole)) == 1, (key, whole)
        if key in sharded:
            parts = zero[key]
            assert sum(parts) == whole[0], (key, parts, whole)
            assert max(parts) <= whole[0] / n + 4096, (key, parts, whole)
        else:
            assert zero[key] == whole, (key, zero[key], whole)


# The MoE features the trainer uses together (as tests/test_dist_mpi.py's FEATURES):
# aux-loss-free bias, shared expert, z-loss, sigmoid scores, SwiGLU, gradient accumulation.
FEATURES = ["bias_update_rate=0.01", "n_shared_experts=1", "z_loss=0.001", "score=sigmoid"]
FEATURES += ["activation=swiglu", "grad_accum=2"]


@pytest.mark.parametrize(
    ("n", "layout", "stage"),
    [
        (2, ["--dp", "2"], 2),
        (2, ["--dp", "2"], 3),
        (2, ["--ep", "2"], 2),
        (2, ["--ep", "2"], 3),
        (4, ["--dp", "2", "--ep", "2"], 1),
        (4, ["--dp", "2", "--ep", "2"], 2),
        (4, ["--dp", "2", "--ep", "2"], 3),
    ],
    ids=[
        "dp2-zero2",
        "dp2-zero3",
        "ep2-zero2",
        "ep2-zero3",
        "dp2ep2-zero1",
        "dp2ep2-zero2",
        "dp2ep2-zero3",
    ],
)
def test_zero_composes_with_expert_parallelism_and_accumulation(tmp_path, corpus, n, layout, stage):
    """Gradient accumulation (stage 2 accumulates its parts), the global-norm clip, the MoE
    aux loss and bias update over the global batch, and ``--ep 2`` (an expert's parameters
    sharded over the ranks holding it, the rest over all ranks; with stage 3 both gathered
    block by block, each over its own ranks): the same curves as the same layout without
    ZeRO."""
    sets = ["--set", *FEATURES]
    plain = _run(tmp_path, corpus, "plain", n, *layout, *sets)
    zero = _run(tmp_path, corpus, "zero", n, *layout, *sets, "--zero", str(stage))
    worst = assert_runs_agree(plain, zero, ZERO_TOL)
    print(f"zero={stage} {layout}: worst {worst}, loss relative {_relative_loss(plain, zero):.3g}")
    if stage == 3 and "--ep" in layout:
        _assert_ep_params_sharded(plain[-1], zero[-1], n)


def _assert_ep_params_sharded(plain, zero, n):
    """Stage 3 with ``--ep 2``: every rank holds fewer parameter bytes than without ZeRO
    (its part of the replicated ones; of its experts, its part over the ranks holding them,
    all of them when no other rank does); with dp 2 × ep 2 at most half (a quarter of the
    replicated ones, half of the experts), up to each bucket's rounding."""
    whole = plain["rank_param_bytes"]
    assert len(whole) == n and len(set(whole)) == 1, whole
    parts = zero["rank_param_bytes"]
    assert all(part < whole[0] for part in parts), (parts, whole)
    if n == 4:
        assert max(parts) <= whole[0] / 2 + 4096, (parts, whole)


def test_zero_clip_engages_and_matches(tmp_path, corpus):
    """A clip threshold below every step's norm: the sharded clip scales each rank's part
    by the same factor plain data parallelism scales the whole gradient by."""
    sets = ["--set", "clip=0.05"]
    plain = _run(tmp_path, corpus, "plain", 2, "--dp", "2", *sets)
    assert all(r["grad_norm"] > 0.05 for r in plain)
    zero = _run(tmp_path, corpus, "zero", 2, "--dp", "2", *sets, "--zero", "2")
    assert_runs_agree(plain, zero, ZERO_TOL)


def test_zero_with_compression_follows_plain_compressed_run(tmp_path, corpus):
    """Compression composes with stage 1 (gradients are still all-reduced, here as top-k
    all-gathers): the same curve as plain data parallelism with the same compression."""
    sets = ["--compress", "topk:0.1"]
    plain = _run(tmp_path, corpus, "plain", 2, "--dp", "2", *sets)
    zero = _run(tmp_path, corpus, "zero", 2, "--dp", "2", *sets, "--zero", "1")
    assert_runs_agree(plain, zero, ZERO_TOL)


def test_ranks_with_different_zero_are_refused_on_every_rank(tmp_path, corpus):
    """One rank with ``--zero 2``, the other with ``--zero 1`` (MPMD): both refuse, naming
    the setting, within seconds."""
    args = ["train", "--preset", "moe-tiny", "--data", str(corpus), "--out", str(tmp_path / "r")]
    args += ["--set", "steps=2", "eval_every=0", "checkpoint_every=0", "seq_len=32", "--dp", "2"]
    cmd = [*mpiexec(1), *_entry(), *args, "--zero", "1", ":"]
    cmd += ["-n", "1", *_entry(), *args, "--zero", "2"]
    code, out, seconds = launch(cmd, timeout=60)
    assert code != 0, out
    assert out.count("zero is 1 on rank 0 but 2 on rank 1") == 2, out
    assert seconds < 30, f"took {seconds:.1f} s"


def _worker(n, mode, corpus, out):
    worker = Path(__file__).parent / "mpi" / "zero_worker.py"
    cmd = [*mpiexec(n), sys.executable, "-m", "mpi4py", str(worker), mode]
    code, text, _ = launch([*cmd, str(corpus), str(out)], timeout=120)
    assert code == 0, text
    assert f"OK {mode} size={n}" in text, text


def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(tmp_path, corpus):
    """NaN on rank 1 only (its embedding): with stage 2 each rank holds part of the NaN
    gradient, but the global norm is NaN on every rank, which skips the same steps."""
    _worker(2, "nonfinite", corpus, tmp_path / "run")


@pytest.mark.parametrize("n", [2, 3])
def test_reduce_scatter_with_uneven_counts_equals_numpy(tmp_path, corpus, n):
    _worker(n, "reduce_scatter", corpus, tmp_path)


def _resume(run_dir, n, *extra, layout=None):
    cmd = [*mpiexec(n)] if n > 1 else []
    layout = ["--dp", str(n)] if layout is None else layout
    cmd += [*_entry(), "train", "--resume", str(run_dir), *layout, *extra]
    code, out, _ = launch([*cmd, "--set", "steps=20"], timeout=300)
    assert code == 0, out


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ((2, "3"), (4, "1")),  # stage 3 on 2 ranks, then stage 1 on 4
        ((2, "0"), (2, "3")),  # a checkpoint of plain data parallelism, then stage 3
        ((4, "2"), (1, "0")),  # stage 2 on 4 ranks, then one process
    ],
    ids=["zero3-dp2-to-zero1-dp4", "plain-dp2-to-zero3-dp2", "zero2-dp4-to-single"],
)
def test_resume_across_stages_and_world_sizes_follows_the_same_curve(tmp_path, corpus, first, then):
    """10 steps with one stage and world size, 10 more with another from its checkpoint:
    the 20-step curve of an uninterrupted run. (The checkpoint holds the whole optimizer
    state, gathered from the ranks' parts; each rank cuts its own parts on resume.) The
    aux loss is off: plain data parallelism computes it per rank, so world sizes differ."""
    sets = ["--set", "aux_loss=0"]
    whole = _run(tmp_path, corpus, "whole", 2, "--dp", "2", *sets, "--zero", "2")
    (n1, z1), (n2, z2) = first, then
    part = _run(tmp_path, corpus, "part", n1, "--dp", str(n1), *sets, "--zero", z1, steps=10)
    assert_runs_agree(whole[:10], part, ACROSS_WORLDS)
    _resume(tmp_path / "part", n2, "--zero", z2)
    assert_runs_agree(whole, read_records(tmp_path / "part"), ACROSS_WORLDS)


EP2 = ["--dp", "1", "--ep", "2"]
DP2EP2 = ["--dp", "2", "--ep", "2"]


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ((2, EP2, "3"), (2, EP2, "1")),  # stage 3 with ep 2, then stage 1 with ep 2
        ((4, DP2EP2, "3"), (2, EP2, "0")),  # stage 3 on dp 2 × ep 2, then plain ep 2
    ],
    ids=["zero3-ep2-to-zero1-ep2", "zero3-dp2ep2-to-plain-ep2"],
)
def test_resume_from_stage3_with_expert_parallelism_follows_the_same_curve(
    tmp_path, corpus, first, then
):
    """10 steps of stage 3 with ``--ep 2`` (each expert's elements written by the rank
    owning them among the ranks holding it, the replicated ones by their owner among all
    ranks), 10 more from its checkpoint under another stage (and world size): the 20-step
    curve of plain expert parallelism without interruption. Aux loss off, as above."""
    sets = ["--set", "aux_loss=0"]
    whole = _run(tmp_path, corpus, "whole", 2, *EP2, *sets)
    (n1, layout1, z1), (n2, layout2, z2) = first, then
    part = _run(tmp_path, corpus, "part", n1, *layout1, *sets, "--zero", z1, steps=10)
    tol = ZERO_TOL if n1 == n2 else ACROSS_WORLDS
    assert_runs_agree(whole[:10], part, tol)
    _resume(tmp_path / "part", n2, "--zero", z2, layout=layout2)
    worst = assert_runs_agree(whole, read_records(tmp_path / "part"), tol)
    print(f"resume {first} -> {then}: worst {worst}")


@pytest.mark.parametrize("n", [2, 3])
def test_stage3_gathers_per_block_with_prefetch_and_frees(tmp_path, corpus, n):
    """Stage 3 on a three-block model: the parameters of plain data parallelism after 3
    steps; the next block's gather in flight during each block's forward; blocks freed
    after forward and between steps; a block forward skips refused on every rank."""
    _worker(n, "stage3", corpus, tmp_path)


def test_an_error_in_forward_with_a_gather_in_flight_ends_the_process_cleanly(tmp_path, corpus):
    """Every rank raises in a block's forward while the next block's gather is in flight,
    then exits: MPI may still deliver into that gather's buffer (the block's parameter
    memory) inside MPI_Finalize, after Python freed everything — Open MPI did, and the
    ranks died of a segmentation fault. The buffers of operations in flight outlive it."""
    _worker(2, "stage3_error", corpus, tmp_path)


@pytest.mark.parametrize("n", [2, 3])
def test_two_stage3_zeros_hook_the_same_blocks_and_refuse_unused_ones(tmp_path, corpus, n):
    """Two stage-3 ZeROs over parts of one model (as the replicated parameters and the
    experts under ``--ep``), each gathering its own over its own communicator: the
    parameters of plain data parallelism after 3 steps; a block forward skips refused on
    every rank, whichever of the two holds its parameters."""
    _worker(n, "stage3_two", corpus, tmp_path)


def test_resume_from_dp2_ep2_stage2_in_one_process_follows_the_same_curve(tmp_path, corpus):
    """Experts in a sharded checkpoint: each expert's elements written by the rank that
    owns them within the ranks holding that expert, in the single-process coordinates."""
    sets = ["--set", *FEATURES]
    whole = _run(tmp_path, corpus, "whole", 1, *sets)
    layout = ["--dp", "2", "--ep", "2", "--zero", "2"]
    part = _run(tmp_path, corpus, "part", 4, *layout, *sets, steps=10)
    assert_runs_agree(whole[:10], part, ACROSS_WORLDS)
    _resume(tmp_path / "part", 1, "--ep", "1", "--zero", "0")
    assert_runs_agree(whole, read_records(tmp_path / "part"), ACROSS_WORLDS)


def _only_checkpoint(run_dir):
    (folder,) = (run_dir / "checkpoints").iterdir()
    return folder


def test_each_rank_writes_its_part_and_export_consolidates(tmp_path, corpus):
    """A stage-2 run on 2 ranks writes one shard per rank (each about half of the model
    and optimizer bytes), named with the layout in state.json and the manifest;
    ``moecore export`` consolidates them into the weights a plain data-parallel run's
    (unsharded) checkpoint holds, up to float32 rounding."""
    import json

    from moecore.train import safetensors

    plain = tmp_path / "plain"
    _run(tmp_path, corpus, "plain", 2, "--dp", "2", steps=6)
    _run(tmp_path, corpus, "zero", 2, "--dp", "2", "--zero", "2", steps=6)
    folder = _only_checkpoint(tmp_path / "zero")
    state = json.loads((folder / "state.json").read_text())
    assert state["sharded"]["shards"] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert (state["sharded"]["world"], state["sharded"]["zero"]) == (2, 2)
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(manifest) == {"state.json", *state["sharded"]["shards"]}
    sizes = [(folder / s).stat().st_size for s in state["sharded"]["shards"]]
    whole = sum(f.stat().st_size for f in _only_checkpoint(plain).glob("*.safetensors"))
    assert abs(sum(sizes) - whole) < 0.02 * whole, (sizes, whole)
    assert max(sizes) < 0.55 * whole, (sizes, whole)
    for name, run in (("zero", tmp_path / "zero"), ("plain", plain)):
        target = tmp_path / f"{name}.safetensors"
        code, out, _ = launch([*_entry(), "export", str(run), "--out", str(target)])
        assert code == 0, out
    got, _ = safetensors.read(str(tmp_path / "zero.safetensors"))
    want, _ = safetensors.read(str(tmp_path / "plain.safetensors"))
    ref, _ = safetensors.read(str(_only_checkpoint(plain) / "model.safetensors"))
    assert sorted(got) == sorted(want) == sorted(ref)
    for key, value in want.items():
        assert value.shape == got[key].shape and value.dtype == got[key].dtype, key
        scale = max(float(abs(value).max()), 1e-30)
        assert float(abs(got[key] - value).max()) <= 1e-5 * scale, key
        assert (ref[key] == value).all(), key


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_shard_missing_or_damaged_is_refused_and_nothing_is_overwritten(tmp_path, corpus, damage):
    """With one shard deleted or one byte changed, resuming and exporting both fail with a
    message naming the shard; no file of the checkpoint changes, no export is written."""
    _run(tmp_path, corpus, "run", 2, "--dp", "2", "--zero", "2", steps=3)
    folder = _only_checkpoint(tmp_path / "run")
    shard = folder / "shard_00001.safetensors"
    if damage == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cmd = [*mpiexec(2), *_entry(), "train", "--resume", str(tmp_path / "run"), "--dp", "2"]
    code, out, _ = launch([*cmd, "--set", "steps=6"], timeout=60)
    assert code != 0, out
    assert str(shard) in out, out
    code, out, _ = launch([*_entry(), "export", str(folder), "--out", str(tmp_path / "w")])
    assert code != 0 and str(shard) in out, out
    assert not (tmp_path / "w").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [folder.name]
