"""``moecore prepare`` and prepared data: tokenizers (a trained BPE round-trips text), shards
read back exactly (uint16 and uint32, against ids computed here from the text or written
here from the format's description), parallel and resumed preparation, damaged data."""

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from corpora import write_prepared

from moecore.cli import main
from moecore.data import DataError, load_corpus, open_prepared
from moecore.data import prepare as prepare_module
from moecore.data.prepare import prepare
from moecore.data.tokenizer import train_bpe

tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

STDLIB = Path(os.__file__).parent


def stdlib_texts(pattern, limit):
    files = sorted(STDLIB.glob(pattern))[:limit]
    return [f.read_text(encoding="utf-8") for f in files]


def word_tokenizer(vocab_size, path):
    """A tokenizer.json mapping the word ``t<i>`` to id i (whitespace-split), so ids past
    65,535 are easy to write and to predict."""
    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path.write_text(tok.to_str())
    return path


def test_a_bpe_trained_on_a_small_corpus_round_trips_text():
    train = stdlib_texts("[a-c]*.py", 20)
    tok = train_bpe(iter(train), 600)
    assert tok.vocab_size == 600 and tok.inner.id_to_token(tok.eod_id) == "<|endoftext|>"
    unseen = [*stdlib_texts("[x-z]*.py", 3), "héllo wörld — ∑ 日本語 🙂\n\ttabs  and  spaces\r\n"]
    for text in unseen:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert max(ids) < 600
    # merges were learnt: code compresses well below a byte per token
    code = unseen[0]
    assert len(tok.encode(code)) < 0.6 * len(code.encode())


def test_byte_shards_hold_each_document_then_the_end_of_document_id(tmp_path):
    texts = {"b.txt": "second\n", "a.txt": "first é\n", "sub/c.txt": "third"}
    for name, text in texts.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    index = prepare([str(tmp_path / "in")], tmp_path / "out", workers=1, log=io.StringIO())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 257 and index["documents"] == 3
    expected = []
    for name in sorted(texts):  # folders are read in path order
        expected += [*texts[name].encode(), 256]
    corpus = load_corpus(tmp_path / "out")
    assert corpus.tokens.to_array().tolist() == expected
    assert index["bytes"] == sum(len(t.encode()) for t in texts.values())


def test_uint32_shards_of_a_large_vocabulary_read_back_exactly(tmp_path):
    tok = word_tokenizer(129_280, tmp_path / "tokenizer.json")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 129_279, size=n) for n in (50, 7, 300, 1)]
    lines = [json.dumps({"text": " ".join(f"t{i}" for i in d)}) for d in docs]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    index = prepare(
        [str(tmp_path / "docs.jsonl")],
        tmp_path / "out",
        tokenizer=str(tok),
        shard_mb=0.0005,  # ~500 bytes: the file is cut at lines into several shards
        log=io.StringIO(),
    )
    assert index["dtype"] == "uint32" and index["vocab_size"] == 129_280
    assert len(index["shards"]) > 1
    expected = np.concatenate([np.append(d, 129_279) for d in docs])
    got = open_prepared(tmp_path / "out").tokens
    np.testing.assert_array_equal(got.to_array(), expected)
    assert got.to_array().max() > 65_535


@pytest.mark.parametrize(("vocab", "dtype"), [(60_000, np.uint16), (129_280, np.uint32)])
def test_shards_written_from_the_format_description_read_back_exactly(tmp_path, vocab, dtype):
    rng = np.random.default_rng(vocab)
    shards = [
        [rng.integers(0, vocab - 1, size=n) for n in sizes] for sizes in ([5, 90], [40], [3, 3, 70])
    ]
    folder = write_prepared(tmp_path / "d", shards, vocab, vocab - 1)
    corpus = open_prepared(folder)
    reference = np.concatenate([np.append(d, vocab - 1) for s in shards for d in s]).astype(dtype)
    assert corpus.tokens.dtype == dtype and corpus.vocab_size == vocab
    np.testing.assert_array_equal(corpus.tokens.to_array(), reference)
    starts = rng.integers(0, len(reference) - 9, size=50)  # windows crossing shard ends too
    index = starts[:, None] + np.arange(9)
    np.testing.assert_array_equal(corpus.tokens[index], reference[index])
    np.testing.assert_array_equal(corpus.tokens[17:150][np.arange(20)], reference[17:37])


def test_two_processes_write_the_same_shards_as_one(tmp_path):
    texts = stdlib_texts("[d-f]*.py", 12)
    for i, text in enumerate(texts):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "in" / "more.jsonl").write_text(
        "".join(json.dumps({"text": t[:500]}) + "\n" for t in texts)
    )
    quiet = io.StringIO()
    one = prepare(
        [str(tmp_path / "in")], tmp_path / "one", train_vocab=400, shard_mb=0.05, log=quiet
    )
    tok = str(tmp_path / "one" / "tokenizer.json")
    two = prepare(
        [str(tmp_path / "in")], tmp_path / "two", tokenizer=tok, shard_mb=0.05, workers=2, log=quiet
    )
    assert len(one["shards"]) > 2
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    # every document decodes back to its text (the files, then the JSON Lines records)
    from moecore.data.tokenizer import load_tokenizer

    decoder = load_tokenizer(tok)
    ids = open_prepared(tmp_path / "two").tokens.to_array()
    docs = np.split(ids, np.flatnonzero(ids == decoder.eod_id) + 1)[:-1]
    assert [decoder.decode(d) for d in docs] == texts + [t[:500] for t in texts]


def test_prepare_resumes_keeping_finished_shards(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    for i, text in enumerate(stdlib_texts("[g-i]*.py", 8)):
        (tmp_path / "in" / f"{i}.txt").write_text(text, encoding="utf-8")
    quiet = io.StringIO()
    full = prepare([str(tmp_path / "in")], tmp_path / "ref", shard_mb=0.005, log=quiet)
    assert len(full["shards"]) >= 4
    # Interrupted (Ctrl-C) while tokenizing the third shard, which leaves its temporary file.
    out = tmp_path / "out"
    original = prepare_module.write_shard

    def interrupted(job):
        if job[1] == 2:
            (out / ".shard_00002.bin.tmp-999").write_bytes(b"half")
            raise KeyboardInterrupt
        return original(job)

    monkeypatch.setattr(prepare_module, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(tmp_path / "in")], out, shard_mb=0.005, log=quiet)
    assert not (out / "index.json").exists()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard_0000[01].*")}
    assert len(kept) == 6  # .bin, .docs.npy and .json of shards 0 and 1
    monkeypatch.setattr(prepare_module, "write_shard", original)
    log = io.StringIO()
    again = prepare([str(tmp_path / "in")], out, shard_mb=0.005, log=log)
    assert f"2 of {len(full['shards'])} shards already written" in log.getvalue()
    assert again == full
    assert not list(out.glob(".*tmp*"))
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard_0000[01].*")}
    assert now == kept
    open_prepared(out)  # every checksum holds
    # A finished shard damaged since is redone, not kept.
    (out / "index.json").unlink()
    (out / "shard_00001.bin").write_bytes(b"xx")
    assert prepare([str(tmp_path / "in")], out, shard_mb=0.005, log=quiet) == full
    # Other inputs into the same folder: refused, naming the folder.
    (tmp_path / "in" / "new.txt").write_text("x")
    with pytest.raises(DataError, match="other inputs or settings"):
        prepare([str(tmp_path / "in")], out, shard_mb=0.005, log=quiet)


def test_damaged_or_missing_shards_are_named(tmp_path):
    rng = np.random.default_rng(1)
    shards = [[rng.integers(0, 255, size=100)], [rng.integers(0, 255, size=80)]]
    folder = write_prepared(tmp_path / "d", shards, 257, 256)
    data = bytearray((folder / "s1.bin").read_bytes())
    data[10] ^= 1
    (folder / "s1.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"s1\.bin does not match its SHA-256"):
        open_prepared(folder)
    (folder / "s1.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match=r"s1\.bin has 160 bytes, its index says 162"):
        open_prepared(folder)
    (folder / "s1.bin").unlink()
    with pytest.raises(DataError, match=r"s1\.bin is missing \(named by .*index\.json\)"):
        open_prepared(folder)
    (folder / "index.json").write_text("{")
    with pytest.raises(DataError, match=r"cannot read .*index\.json"):
        open_prepared(folder)


def test_cli_prepare_and_its_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("hello\n")
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")]) == 0
    assert "7 tokens" in capsys.readouterr().out  # 6 bytes and the end-of-document id
    assert main(["prepare", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o2")]) == 2
    assert "input " in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    assert main(["prepare", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o3")]) == 2
    assert "string field 'text'" in capsys.readouterr().err
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a"))
    (tmp_path / "t.json").write_text(tok.to_str())
    args = ["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o4")]
    assert main([*args, "--tokenizer", str(tmp_path / "t.json")]) == 2
    assert "--eod TOKEN" in capsys.readouterr().err
    # Without the tokenizers library: how to get it.
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert main([*args, "--train-bpe", "300"]) == 2
    assert "pip install moecore[data]" in capsys.readouterr().err
