"""Training on prepared data: a 129,280-id vocabulary, validation held out by documents,
each rank reading its own rows, mixtures (weights within sampling error, bit-exact resume,
the TOML table form), generate with the run's tokenizer, and the config's data errors."""

import io
import json

import numpy as np
import pytest
from corpora import write_prepared

from moecore.cli import main
from moecore.data import Corpus, DataError, Mixture, TokenView, load_data, open_prepared
from moecore.train import ConfigError, Trainer, build_config
from moecore.train import checkpoint as ckpt
from moecore.train.metrics import read_metrics

TINY = {"eval_every": 5, "checkpoint_every": 5, "seq_len": 16, "batch_size": 4}


def random_docs(rng, vocab, sizes):
    return [rng.integers(0, vocab - 1, size=n) for n in sizes]


def test_a_129280_id_vocabulary_trains_moe_tiny(tmp_path):
    vocab = 129_280
    rng = np.random.default_rng(0)
    # ids spread over the whole range, many past 65,535: uint32 shards
    shards = [random_docs(rng, vocab, [300] * 8), random_docs(rng, vocab, [300] * 8)]
    folder = write_prepared(tmp_path / "big", shards, vocab, vocab - 1)
    config = build_config("moe-tiny", overrides={**TINY, "steps": 3, "data": str(folder)})
    assert config.vocab_size == vocab  # from the index
    trainer = Trainer(config, tmp_path / "run", out=io.StringIO())
    assert trainer.model.state_dict()["tok_emb.weight"].shape[0] == vocab
    x, _ = trainer.data.train_batch(16, 4, 0, 0)
    assert x.max() > 65_535
    result = trainer.train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # at initialisation the model predicts about uniformly: loss ≈ ln(vocab)
    assert abs(records[0]["loss"] - np.log(vocab)) < 0.5
    assert result.steps_done == 3 and np.isfinite(result.final_loss)


def test_validation_is_held_out_by_whole_documents(tmp_path):
    rng = np.random.default_rng(1)
    sizes = [200, 150, 90, 60, 40, 30, 25]
    folder = write_prepared(tmp_path / "d", [random_docs(rng, 500, sizes)], 500, 499)
    corpus = open_prepared(folder)
    starts = np.cumsum([0] + [n + 1 for n in sizes[:-1]])
    # bytes recorded per document: 2 per token; the last documents holding ≥ 5% of them
    need = 0.05 * sum(2 * n for n in sizes)
    taken, first = 0, len(sizes)
    while taken < need:
        first -= 1
        taken += 2 * sizes[first]
    assert corpus.split_at == starts[first] and corpus.val_bytes == taken
    assert len(corpus.train) + len(corpus.val) == len(corpus.tokens)


def test_each_rank_reads_only_its_rows(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    folder = write_prepared(tmp_path / "d", [random_docs(rng, 300, [400] * 5)], 300, 299)
    data = load_data(str(folder))
    full_x, full_y = data.train_batch(16, 8, 7, 3)
    read = []
    original = TokenView.__getitem__

    def spy(self, key):
        if not isinstance(key, slice):
            read.append(np.asarray(key).copy())
        return original(self, key)

    monkeypatch.setattr(TokenView, "__getitem__", spy)
    for rank in range(4):
        read.clear()
        x, y = data.train_batch(16, 8, 7, 3, rows=slice(2 * rank, 2 * rank + 2))
        np.testing.assert_array_equal(x, full_x[2 * rank : 2 * rank + 2])
        np.testing.assert_array_equal(y, full_y[2 * rank : 2 * rank + 2])
        assert sum(r.size for r in read) == 2 * 17  # two windows of seq_len + 1 ids


def constant_corpus(name, token, n=10_000):
    return Corpus(name, np.full(n, token, np.uint16), 256, 1)


def test_a_mixture_hits_its_weights_within_sampling_error():
    mix = Mixture(
        (constant_corpus("a", 1), constant_corpus("b", 2), constant_corpus("c", 3)), (0.6, 0.3, 0.1)
    )
    n_rows, counts = 0, np.zeros(3)
    for step in range(300):
        x, _ = mix.train_batch(8, 16, seed=5, step=step)
        counts += [(x[:, 0] == t).sum() for t in (1, 2, 3)]
        n_rows += 16
        # every row comes from one source only
        assert all(len(set(row)) == 1 for row in x.tolist())
    for p, k in zip(mix.weights, counts):
        sd = np.sqrt(p * (1 - p) / n_rows)
        assert abs(k / n_rows - p) < 4 * sd, (p, k / n_rows)
    # the same (seed, step) gives the same batch, another seed another one
    np.testing.assert_array_equal(mix.train_batch(8, 16, 5, 9)[0], mix.train_batch(8, 16, 5, 9)[0])
    assert not np.array_equal(mix.sources_of(64, 5, 9), mix.sources_of(64, 6, 9))


def two_sources(tmp_path):
    rng = np.random.default_rng(3)
    a = write_prepared(tmp_path / "a", [random_docs(rng, 256, [500] * 6)], 257, 256)
    b = write_prepared(tmp_path / "b", [random_docs(rng, 64, [300] * 9)], 257, 256)
    return a, b


def test_resume_across_a_mixture_is_bit_exact(tmp_path):
    a, b = two_sources(tmp_path)
    spec = f"0.7:{a},0.3:{b}"
    config = build_config("moe-tiny", overrides={**TINY, "steps": 10, "data": spec})
    Trainer(config, tmp_path / "full", out=io.StringIO()).train()
    partial = build_config("moe-tiny", overrides={**config.to_dict(), "steps": 5})
    Trainer(partial, tmp_path / "part", out=io.StringIO()).train()
    resumed = Trainer.resume(tmp_path / "part", out=io.StringIO(), overrides={"steps": 10})
    assert resumed.step == 5
    resumed.train()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    part = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["loss"] for r in part] == [r["loss"] for r in full]
    assert [r.get("val_loss") for r in part] == [r.get("val_loss") for r in full]
    x, _ = ckpt.load(ckpt.latest(tmp_path / "full"))
    y, _ = ckpt.load(ckpt.latest(tmp_path / "part"))
    for name, value in x["model"].items():
        np.testing.assert_array_equal(value, y["model"][name])


def test_a_mixture_table_in_toml_and_data_errors_name_the_setting(tmp_path):
    a, b = two_sources(tmp_path)
    toml = tmp_path / "run.toml"
    toml.write_text(f'steps = 3\n\n[data]\n"{a}" = 3\n"{b}" = 1\n')
    config = build_config("moe-tiny", toml)
    assert config.data == f"3.0:{a},1.0:{b}" and config.vocab_size == 257
    assert load_data(config.data).weights == (0.75, 0.25)
    toml.write_text(f'[data]\n"{a}" = 0\n')
    with pytest.raises(ConfigError, match=f"data: weight of '{a}' must be > 0, got 0"):
        build_config("moe-tiny", toml)
    toml.write_text(f'[data]\n"{a}" = "x"\n')
    with pytest.raises(ConfigError, match="must be a number, got 'x'"):
        build_config("moe-tiny", toml)
    with pytest.raises(ConfigError, match=r"data '-1:a,b': weight of 'a' must be > 0, got -1.0"):
        build_config("moe-tiny", overrides={"data": "-1:a,b"})
    with pytest.raises(
        ConfigError, match=r"vocab_size \(256\) is smaller than the data's vocabulary \(257\)"
    ):
        Trainer(
            build_config("moe-tiny", overrides={"data": str(a), "vocab_size": 256}), tmp_path / "r"
        )
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"0.5:{a},0.5:{tmp_path / 'nowhere'}")
    (tmp_path / "bytes.txt").write_text("x" * 5000)
    with pytest.raises(DataError, match="must share a tokenizer"):
        load_data(f"0.5:{a},0.5:{tmp_path / 'bytes.txt'}")


def test_train_and_generate_with_a_trained_bpe(tmp_path, corpus, capsys):
    pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    data = tmp_path / "bpe"
    assert main(["prepare", str(corpus), "--out", str(data), "--train-bpe", "400"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    args = ["train", "--preset", "moe-tiny", "--data", str(data), "--out", str(out)]
    assert main([*args, "--set", "steps=2", "eval_every=0"]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400
    assert (out / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    capsys.readouterr()
    gen = ["generate", "--run", str(out), "--prompt", "def ", "--tokens", "5", "--seed", "1"]
    assert main(gen) == 0
    text = capsys.readouterr().out
    # five sampled BPE tokens decode to text longer than five bytes' worth of the prompt
    from moecore.data.tokenizer import run_tokenizer
    from moecore.train.generate import generate_ids

    model = Trainer.resume(out, out=io.StringIO()).model
    tok = run_tokenizer(out)
    ids = generate_ids(model, tok.encode("def "), 5, 0.8, None, 1)
    assert text == "def " + tok.decode(ids) + "\n"
    # eval reports bits per byte over the held-out documents' text
    assert main(["eval", "--run", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    prepared = open_prepared(data)
    assert 0 < prepared.val_bytes < 0.06 * corpus.stat().st_size
    expected = record["val_loss"] * len(prepared.val) / prepared.val_bytes / np.log(2)
    assert record["val_bits_per_byte"] == pytest.approx(expected, rel=1e-12)
