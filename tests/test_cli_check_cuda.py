"""`moecore check-cuda`: every CUDA kernel compiled with NVRTC, no GPU needed."""

import sys

import pytest

from moecore.cli import main
from moecore.kernels.cuda import sources


def _needs_nvrtc() -> None:
    try:
        from cupy.cuda import nvrtc  # noqa: F401
    except ImportError:
        pytest.skip('CuPy with NVRTC is not installed (pip install "moecore[gpu-ci]")')


def test_check_cuda_compiles_every_declared_kernel_for_both_default_archs(capsys):
    _needs_nvrtc()
    assert main(["check-cuda"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:3]) for line in lines[1:-1]}
    declared = {(f, k) for f in sources.families() for k in sources.kernel_names(f)}
    assert rows == {(f, k, arch) for f, k in declared for arch in ("sm_80", "sm_90")}
    assert lines[-1] == f"{2 * len(declared)} kernel builds, no warnings, no spills"


def test_check_cuda_fails_with_nvrtc_message_on_a_bad_arch(capsys):
    _needs_nvrtc()
    assert main(["check-cuda", "--arch", "sm_12345"]) == 1
    err = capsys.readouterr().err
    assert "CUDA compile failed" in err and "sm_12345" in err


def test_check_cuda_without_cupy_names_the_extra_to_install(monkeypatch, capsys):
    for name in ("cupy", "cupy.cuda", "cupy.cuda.nvrtc", "cupy._core"):
        monkeypatch.setitem(sys.modules, name, None)  # `import cupy` now fails as if absent
    assert main(["check-cuda"]) == 1
    err = capsys.readouterr().err
    assert "cupy" in err and 'pip install "moecore[gpu-ci]"' in err
