"""``MOECORE_CPU_LEVEL`` caps the kernel level: each level is reported by ``build_info`` and
``moecore info``, and the kernels give the same results on every level as float64 numpy
references (and as the native run). Each level runs in its own interpreter, since the level is
read once, at import. A bad value stops the import with a ValueError naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _bsr_reference import assert_product_close, dense_dw

from moecore import build_info
from moecore.kernels.activation import ArrayActivation
from moecore.kernels.attention import ArrayAttention
from moecore.kernels.norm import ArrayNorm
from moecore.sparse import BsrMatrix

ENV = "MOECORE_CPU_LEVEL"
LEVELS = ["baseline", "avx2", "avx512"]
ORDER = {name: i for i, name in enumerate(LEVELS)}

# Runs every dispatching kernel family on fixed inputs and saves the outputs.
CHILD = r"""
import json, sys
import numpy as np
from moecore import _core, build_info
from moecore.compress import TopK
from moecore.sparse import BsrMatrix, bsr_linear, bsr_linear_dw, bsr_linear_dx, kernel_isa

rng = np.random.default_rng(0)
out = {}
x = rng.standard_normal((37, 203)).astype(np.float32)
out["gelu"] = _core.fused_gelu(x)
out["gelu_dx"] = _core.fused_gelu_backward(np.ones_like(x), x)
qkv = rng.standard_normal((2, 19, 3 * 48)).astype(np.float32)
out["attn"], probs = _core.fused_attention_forward(qkv, 3, True)
out["attn_dqkv"] = _core.fused_attention_backward(qkv, probs, np.ones_like(out["attn"]), 3, True)
h = rng.standard_normal((29, 77)).astype(np.float32)
w, b = (rng.standard_normal(77).astype(np.float32) for _ in range(2))
out["norm"], mean, rstd = _core.fused_norm_forward(h, w, b, 1e-5, True)
out["norm_dx"], out["norm_dw"], out["norm_db"] = _core.fused_norm_backward(
    np.ones_like(h), h, mean, rstd, w, 1e-5, True, True, True)
for block in (16, 32):
    m = BsrMatrix.random((128, 192), block, 0.3, seed=block)
    xs = rng.standard_normal((45, 192)).astype(np.float32)
    dy = rng.standard_normal((45, 128)).astype(np.float32)
    out[f"bsr{block}_x"], out[f"bsr{block}_dy"] = xs, dy
    out[f"bsr{block}"] = bsr_linear(xs, m)
    out[f"bsr{block}_dx"] = bsr_linear_dx(dy, m)
    out[f"bsr{block}_dw"] = bsr_linear_dw(dy, xs, m)
g = (rng.standard_normal(100_003) * (1.0 + np.arange(100_003) % 7)).astype(np.float32)
out["topk_g"] = g
exact = TopK(ratio=0.01, method="exact", error_feedback=False)
out["topk_exact"] = exact.decompress(*exact.compress(g))
out["topk_sampled_payload"] = TopK(ratio=0.01, error_feedback=False, seed=3).compress(g)[0]
np.savez(sys.argv[1], **out)
info = {k: v for k, v in build_info().items() if k.startswith("cpu_level")}
info["bsr_isa"] = kernel_isa()
print(json.dumps(info))
"""


def _child_env(level: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(ENV, None)
    if level is not None:
        env[ENV] = level
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    return env


def _run(level: str | None, tmp_path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    path = tmp_path / f"{level or 'native'}.npz"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        env=_child_env(level),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(path) as saved:
        return json.loads(proc.stdout), dict(saved)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return _run(None, tmp_path_factory.mktemp("native"))


def _close(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=tol * scale)


def _check_against_numpy(out: dict[str, np.ndarray]) -> None:
    """Every output against a float64 numpy reference written apart from the kernels."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 203)).astype(np.float32).astype(np.float64)
    y, saved = ArrayActivation.gelu_forward(x, "tanh")
    _close(out["gelu"], y, 1e-6)
    _close(out["gelu_dx"], ArrayActivation.gelu_backward(np.ones_like(x), x, saved, "tanh"), 1e-5)
    qkv = rng.standard_normal((2, 19, 3 * 48)).astype(np.float32).astype(np.float64)
    attn, saved = ArrayAttention.forward(qkv, 3, True, None)
    _close(out["attn"], attn, 1e-5)
    dqkv = ArrayAttention.backward(np.ones_like(attn), saved, (2, 19, 3, 48), True, None)
    _close(out["attn_dqkv"], dqkv, 1e-4)
    h = rng.standard_normal((29, 77)).astype(np.float32).astype(np.float64)
    w, b = (rng.standard_normal(77).astype(np.float32).astype(np.float64) for _ in range(2))
    norm, saved = ArrayNorm.forward(h, w, b, 1e-5, True)
    _close(out["norm"], norm, 1e-5)
    for got, want in zip(
        (out["norm_dx"], out["norm_dw"], out["norm_db"]),
        ArrayNorm.backward(np.ones_like(h), saved, True, True, True),
        strict=True,
    ):
        _close(got, want, 1e-5)
    for block in (16, 32):
        m = BsrMatrix.random((128, 192), block, 0.3, seed=block)
        xs, dy, dense = out[f"bsr{block}_x"], out[f"bsr{block}_dy"], m.to_dense()
        assert_product_close(out[f"bsr{block}"], xs, dense.T, 192)
        assert_product_close(out[f"bsr{block}_dx"], dy, dense, 128)
        want, bound = dense_dw(dy, xs, m)
        assert np.all(np.abs(out[f"bsr{block}_dw"] - want) <= bound + 1e-30)
    g = out["topk_g"]
    k = round(0.01 * g.size)
    top = np.argsort(-np.abs(g), kind="stable")[:k]
    want = np.zeros_like(g)
    want[top] = g[top]
    np.testing.assert_array_equal(out["topk_exact"], want)


@pytest.mark.parametrize("level", LEVELS)
def test_forced_level_is_reported_and_gives_the_reference_results(level, native, tmp_path):
    native_info, native_out = native
    info, out = _run(level, tmp_path)
    expected = min(level, native_info["cpu_level_native"], key=ORDER.__getitem__)
    assert info["cpu_level"] == expected
    assert info["cpu_level_native"] == native_info["cpu_level_native"]
    assert ENV in info["cpu_level_source"]
    assert info["bsr_isa"] == {"baseline": "scalar"}.get(expected, expected)
    _check_against_numpy(out)
    # The same selection, bit for bit, on every path; floats within rounding of the native run.
    np.testing.assert_array_equal(out["topk_sampled_payload"], native_out["topk_sampled_payload"])
    np.testing.assert_array_equal(out["topk_exact"], native_out["topk_exact"])
    for name, want in native_out.items():
        if not name.startswith("topk"):
            _close(out[name], want.astype(np.float64), 1e-4)


def test_native_run_reports_the_detected_level(native):
    native_info, native_out = native
    assert native_info["cpu_level"] == native_info["cpu_level_native"]
    assert native_info["cpu_level_source"].startswith("detected")
    _check_against_numpy(native_out)
    if ENV not in os.environ:
        assert build_info()["cpu_level"] == native_info["cpu_level"]


def test_info_shows_the_level_and_where_it_came_from():
    proc = subprocess.run(
        [sys.executable, "-m", "moecore.cli", "info"],
        env=_child_env("baseline"),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(row for row in proc.stdout.splitlines() if row.startswith("kernel level"))
    assert "baseline" in line and f"forced by {ENV}" in line
    assert "gemm" in line  # says what the variable does not govern


@pytest.mark.parametrize("bad", ["avx1024", "sse2", "native"])
def test_a_bad_value_stops_the_import_with_a_clear_error(bad):
    proc = subprocess.run(
        [sys.executable, "-c", "import moecore"],
        env=_child_env(bad),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert f'ValueError: {ENV}="{bad}" is not a kernel level' in proc.stderr
    assert "avx512, avx2 or baseline" in proc.stderr
