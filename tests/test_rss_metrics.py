"""``metrics.jsonl`` carries the process's resident memory every step (now and peak),
checked against /proc/self/status (VmRSS, VmHWM), an independent source."""

import io
from pathlib import Path

import pytest

from moecore.train import Trainer, build_config
from moecore.train.metrics import read_metrics
from moecore.train.rss import rss_record


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_rss_record_matches_proc_status():
    record = rss_record()
    assert abs(record["rss_mb"] - _status_mib("VmRSS")) < 8
    assert abs(record["peak_rss_mb"] - _status_mib("VmHWM")) < 8
    assert record["peak_rss_mb"] >= record["rss_mb"] - 0.1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_every_step_records_current_and_peak_rss(tmp_path):
    config = build_config("moe-tiny", overrides={"steps": 3, "eval_every": 0, "seq_len": 32})
    Trainer(config, tmp_path / "run", out=io.StringIO()).train()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 3
    for r in records:
        assert 10 < r["rss_mb"] <= r["peak_rss_mb"] + 0.1
        assert r["peak_rss_mb"] <= _status_mib("VmHWM") + 0.1
    peaks = [r["peak_rss_mb"] for r in records]
    assert peaks == sorted(peaks)  # a peak never goes down
