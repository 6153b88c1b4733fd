"""The benchmarks' choice of kernel paths (issue 33: on an AVX-512 CPU they measure the AVX2
path beside the native one): the levels asked for, the default, and one run per level with
moecore's kernels really capped there (checked against moecore's own ``build_info``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches" / "py"
sys.path.insert(0, str(BENCHES))
import _common  # noqa: E402  (the benchmarks' helpers live beside them, not in the package)


def test_levels_asked_for_are_kept_in_order() -> None:
    assert _common.cpu_levels("avx2, baseline") == ["avx2", "baseline"]
    assert _common.cpu_levels("avx512") == ["avx512"]


@pytest.mark.parametrize("bad", ["avx3", "avx2,sse", ","])
def test_unknown_levels_are_refused_by_name(bad: str) -> None:
    with pytest.raises(SystemExit, match="unknown level"):
        _common.cpu_levels(bad)


@pytest.mark.parametrize(
    ("native", "want"),
    [("avx512", ["avx512", "avx2"]), ("avx2", ["avx2"]), ("baseline", ["baseline"])],
)
def test_default_adds_the_avx2_path_on_an_avx512_cpu(monkeypatch, native, want) -> None:
    import moecore

    info = dict(moecore.build_info())
    info["cpu_level_native"] = native
    monkeypatch.setattr(moecore, "build_info", lambda: info)
    assert _common.cpu_levels(None) == want


def test_one_run_per_level_under_that_level(tmp_path: Path) -> None:
    script = tmp_path / "bench.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(BENCHES)!r})
            from _common import rerun_per_level, results_path
            if not rerun_per_level(["avx2", "baseline"]):
                from moecore import build_info
                print("LEVEL " + json.dumps([build_info()["cpu_level"], results_path("x").name]))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MOECORE_CPU_LEVEL",)}
    env.pop("MOECORE_BENCH_ONE_LEVEL", None)
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    runs = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("LEVEL ")]
    native = __import__("moecore").build_info()["cpu_level_native"]
    # A level above the CPU's falls back to the CPU's own (moecore says so in build_info).
    avx2 = "avx2" if native in ("avx512", "avx2") else "baseline"
    assert runs == [[avx2, "x_avx2.json"], ["baseline", "x_baseline.json"]]
    assert "MOECORE_CPU_LEVEL=avx2" in out and "MOECORE_CPU_LEVEL=baseline" in out
