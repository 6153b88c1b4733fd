"""``metrics.jsonl`` carries the process's resident memory every step (now and peak),
checked against /proc/self/statm and getrusage, independent sources of the same figures."""

import io
import os
import resource
from pathlib import Path

import pytest

from moecore.train import Trainer, build_config
from moecore.train.metrics import read_metrics
from moecore.train.rss import rss_record


def _statm_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_rss_record_matches_proc_status():
    record = rss_record()
    assert abs(record["rss_mb"] - _statm_rss_mib()) < 8
    assert abs(record["peak_rss_mb"] - _peak_mib()) < 8
    assert record["peak_rss_mb"] >= record["rss_mb"] - 0.1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_every_step_records_current_and_peak_rss(tmp_path):
    config = build_config("moe-tiny", overrides={"steps": 3, "eval_every": 0, "seq_len": 32})
    Trainer(config, tmp_path / "run", out=io.StringIO()).train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 3
    for r in records:
        assert 10 < r["rss_mb"] <= r["peak_rss_mb"] + 0.1
        assert r["peak_rss_mb"] <= _peak_mib() + 1
    peaks = [r["peak_rss_mb"] for r in records]
    assert peaks == sorted(peaks)  # a peak never goes down
