"""What a user gets from the package itself: the version it reports, a Rust panic surfacing as
a Python exception in this very build, and, for an installed wheel, the license file and the
stable-ABI extension (docs/release.md)."""

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import moecore
from moecore import _core
from moecore.cli import main
from moecore.errors import InternalError

ROOT = Path(__file__).resolve().parent.parent


def _cargo_version() -> str:
    with open(ROOT / "Cargo.toml", "rb") as f:
        return tomllib.load(f)["package"]["version"]


def test_version_flag_prints_the_crate_version():
    proc = subprocess.run(
        [sys.executable, "-m", "moecore.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"moecore {_cargo_version()}\n"


def test_version_flag_exits_zero_without_a_command(capsys):
    assert main(["--version"]) == 0  # main() returns argparse's status instead of exiting
    assert capsys.readouterr().out.strip() == f"moecore {moecore.__version__}"


@pytest.mark.parametrize("in_worker", [False, True], ids=["calling-thread", "rayon-worker"])
def test_rust_panic_becomes_internal_error(in_worker):
    # The unwinder is part of the link (zig's in the release wheel): a broken one aborts here.
    with pytest.raises(InternalError, match=r"panic test: internal error .*: boom 7"):
        _core._panic_for_tests("boom 7", in_worker=in_worker)
    # The extension still works after the panic (the rayon pool survived it).
    assert _core.bsr_kernel_isa()


def _installed() -> metadata.Distribution:
    """moecore's installed distribution, or a skip when the tests import it from a checkout."""
    try:
        dist = metadata.distribution("moecore")
    except metadata.PackageNotFoundError:
        pytest.skip("moecore is imported from a source tree, not installed from a wheel")
    package_dir = Path(moecore.__file__).resolve().parent
    if Path(dist.locate_file("moecore")).resolve() != package_dir:
        pytest.skip(f"moecore is imported from {package_dir}, not from the installed wheel")
    return dist


def test_installed_wheel_carries_license_and_metadata():
    dist = _installed()
    files = {str(f) for f in dist.files or []}
    license_file = next((f for f in files if f.endswith("licenses/LICENSE")), None)
    assert license_file is not None, sorted(f for f in files if "dist-info" in f)
    text = Path(dist.locate_file(license_file)).read_text()
    assert (ROOT / "LICENSE").read_text() == text
    assert dist.metadata["License-Expression"] == "Apache-2.0"
    assert dist.version == _cargo_version()
    assert "Programming Language :: Rust" in dist.metadata.get_all("Classifier")


def test_installed_extension_uses_the_stable_abi():
    dist = _installed()
    assert Path(_core.__file__).name == "_core.abi3.so"
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(": ", 1)[1] for line in wheel.splitlines() if line.startswith("Tag: ")]
    assert tags and all(t.startswith("cp311-abi3-") for t in tags), tags


# Imports that fail as on a machine where only moecore's declared dependencies are
# installed: every top-level module outside the standard library, moecore and those
# dependencies raises ModuleNotFoundError, as a fresh `pip install .` would.
_ONLY_DECLARED = """
import sys, importlib.abc
allowed = set(sys.argv[1].split(",")) | set(sys.stdlib_module_names) | {"moecore", "_distutils_hack"}
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in allowed:
            raise ModuleNotFoundError(f"No module named {top!r} (not declared)", name=top)
        return None
sys.meta_path.insert(0, Missing())
from moecore.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_train_needs_only_the_declared_dependencies(tmp_path):
    """`pip install . && moecore train` works with nothing but pyproject's `dependencies`
    (a dependency imported at start-up but only declared in an extra fails here)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    names = [
        d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        for d in declared
    ]
    modules = ",".join(n.replace("-", "_") for n in names)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _ONLY_DECLARED,
            modules,
            "train",
            "--preset",
            "moe-tiny",
            "--set",
            "steps=2",
            "--set",
            "eval_every=0",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finished after 2 steps" in out.stdout
