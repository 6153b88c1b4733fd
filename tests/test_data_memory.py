"""A corpus larger than the run's memory budget trains without its resident memory growing
with the corpus: a 2 GiB memory-mapped shard (sparse, so cheap to make) against a 2 MiB one,
each trained in a fresh process whose peak RSS (VmHWM) is read from /proc/self/status.
(Checksums are not verified here: reading the file once does not grow RSS either, but takes
seconds; test_data_prepare.py checks them.)"""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

CHILD = textwrap.dedent(
    """
    import io, json, sys
    from pathlib import Path
    from moecore.train import Trainer, build_config

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    config = build_config("moe-tiny", overrides={
        "data": sys.argv[1], "steps": 4, "eval_every": 2, "checkpoint_every": 0,
        "memory_limit_gb": 0.5, "data_verify": False,
    })
    result = Trainer(config, Path(sys.argv[2]), out=io.StringIO()).train()
    print(json.dumps({"peak": status("VmHWM"), "steps": result.steps_done}))
    """
)

DOC = 1 << 20  # tokens per document


def sparse_shard(folder: Path, tokens: int) -> Path:
    """A prepared folder of one shard of ``tokens`` zero ids (a sparse file: nothing is
    written but the size), documents of DOC ids, vocabulary 256 and end id 0."""
    folder.mkdir()
    with open(folder / "s.bin", "wb") as fh:
        fh.truncate(tokens * 2)
    h = hashlib.sha256()
    zeros = bytes(1 << 24)
    for _ in range(tokens * 2 // len(zeros)):
        h.update(zeros)
    h.update(bytes(tokens * 2 % len(zeros)))
    starts = np.arange(0, tokens, DOC, dtype=np.int64)
    np.save(folder / "s.docs.npy", np.stack([starts, np.full_like(starts, DOC)], axis=1))
    docs_sha = hashlib.sha256((folder / "s.docs.npy").read_bytes()).hexdigest()
    shard = {
        "file": "s.bin",
        "tokens": tokens,
        "sha256": h.hexdigest(),
        "docs_file": "s.docs.npy",
        "docs_sha256": docs_sha,
        "documents": len(starts),
        "bytes": int(len(starts) * DOC),
    }
    index = {"format": "moecore-shards", "version": 1, "dtype": "uint16", "vocab_size": 256}
    index |= {"eod_id": 0, "tokenizer": {"kind": "none"}, "shards": [shard]}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def peak_rss(data: Path, run: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["steps"] == 4
    return int(record["peak"])


@pytest.mark.slow
def test_a_corpus_larger_than_the_memory_budget_trains_in_constant_memory(tmp_path):
    small = peak_rss(sparse_shard(tmp_path / "small", 1 << 20), tmp_path / "run_small")
    big = sparse_shard(tmp_path / "big", 1 << 30)  # 1 Gi ids: 2 GiB, 4× the 0.5 GiB budget
    assert (big / "s.bin").stat().st_size == 2 << 30
    large = peak_rss(big, tmp_path / "run_big")
    assert large < 0.5 * 2**30, f"peak RSS {large / 2**20:.0f} MiB"
    # what the corpus adds: the windows read and the documents table, not the corpus
    assert large - small < 16 * 2**20, (small / 2**20, large / 2**20)
