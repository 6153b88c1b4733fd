"""Pipeline parallelism splits the model, not only its activations: each rank's parameter,
gradient and optimizer-state bytes (``rank_*_bytes`` in ``metrics.jsonl``) are its stages'
share, counted here by hand from the single-process model, and its peak RSS shrinks with pp."""

from __future__ import annotations

import json

import pytest
from parallel_harness import train_run

from moecore.train.config import config_from_dict
from moecore.train.trainer import build_model

pytestmark = [pytest.mark.mpi]

SETS = ["n_layers=4", "eval_every=0", "checkpoint_every=0", "seq_len=32"]


def _args(corpus, m, *extra, steps=2):
    args = ["--preset", "moe-tiny", "--data", str(corpus), "--set", f"steps={steps}"]
    return [*args, f"grad_accum={m}", *SETS, *extra]


def _stage_names(names, blocks, first, last):
    """The tensors a rank running ``blocks`` holds (by hand: the embedding with the first
    stage, and — tied to the output layer — with the last; the final norm with the last)."""
    mine = []
    for name in names:
        top, _, rest = name.partition(".")
        if top == "blocks":
            keep = int(rest.split(".")[0]) in blocks
        elif top == "tok_emb":
            keep = first or last
        elif top == "pos_emb":
            keep = first
        else:  # the final norm
            keep = last
        if keep:
            mine.append(name)
    return mine


@pytest.mark.parametrize(
    ("pp", "schedule", "m", "held"),
    [
        # pipeline rank → (blocks, holds the first stage, holds the last stage)
        (2, "1f1b", 4, [({0, 1}, True, False), ({2, 3}, False, True)]),
        # 2 chunks per rank: stage c·p + r on rank r (4 stages of one block)
        (2, "interleaved", 4, [({0, 2}, True, False), ({1, 3}, False, True)]),
        # rank r holds stages r and p − 1 − r
        (
            4,
            "dualpipe",
            8,
            [
                ({0, 3}, True, True),
                ({1, 2}, False, False),
                ({1, 2}, False, False),
                ({0, 3}, True, True),
            ],
        ),
    ],
)
def test_each_rank_holds_its_stages_parameters_and_optimizer_state(
    tmp_path, corpus, pp, schedule, m, held
):
    got = train_run(
        tmp_path / "pp", pp, [*_args(corpus, m), "--pp", str(pp), "--schedule", schedule]
    )
    # The whole model as one process builds it from the run's configuration.
    config = json.loads((tmp_path / "pp" / "config.json").read_text())
    whole = build_model(config_from_dict({**config, "pp": 1}))
    sizes = {n: p.data.nbytes for n, p in whole.named_parameters()}
    for record in got:
        for r, (blocks, first, last) in enumerate(held):
            expected = sum(sizes[n] for n in _stage_names(sizes, blocks, first, last))
            assert record["rank_param_bytes"][r] == expected, (r, record)
            assert record["rank_grad_bytes"][r] == expected, (r, record)
            # AdamW: exp_avg and exp_avg_sq in float32, as the parameters
            assert record["rank_optimizer_bytes"][r] == 2 * expected, (r, record)


def test_memory_per_rank_shrinks_with_pp(tmp_path, corpus):
    """A model whose experts dominate memory (4 MoE layers × 64 experts of d_ff 512, ~17 MB
    each), one step: parameters and optimizer state per rank halve from one process to pp 2 and
    again to pp 4, and so does the largest peak RSS, by at least a third of the difference
    in state (the process itself and the activations are not split; at start-up a rank
    briefly builds the whole model)."""
    big = ["--set", "n_experts=64", "d_ff=512", "steps=1"]
    one = _last(train_run(tmp_path / "one", 1, [*_args(corpus, 4), *big]))
    runs = {1: one}
    for pp in (2, 4):
        args = [*_args(corpus, 4 if pp == 2 else 8), *big, "--pp", str(pp)]
        runs[pp] = _last(train_run(tmp_path / f"pp{pp}", pp, args))
    state = {
        pp: max(p + o for p, o in zip(r["rank_param_bytes"], r["rank_optimizer_bytes"]))
        for pp, r in runs.items()
    }
    assert state[2] < 0.55 * state[1] and state[4] < 0.55 * state[2], state
    peak = {pp: max(r["rank_peak_rss_mb"]) for pp, r in runs.items()}
    for a, b in ((1, 2), (2, 4)):
        saved_mb = (state[a] - state[b]) / 2**20
        assert peak[b] < peak[a] - saved_mb / 3, (peak, state)
    print(f"largest per-rank state bytes {state}, peak RSS MiB {peak}")


def _last(records):
    """The last step's record (peak RSS only grows)."""
    return records[-1]
