"""`moecore info`: the first command a new user runs."""

import json
import subprocess
import sys

import numpy as np

import moecore
from moecore.cli import main


def test_info_prints_versions_and_exits_zero(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert moecore.__version__ in out
    assert np.__version__ in out
    assert "CuPy / GPU" in out and "mpi4py / MPI" in out


def test_info_json_is_parseable_and_consistent(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["numpy"] == np.__version__
    assert facts["build_profile"] in {"release", "debug"}
    # An installed wheel is a release build; a debug build here would make every benchmark lie.
    assert facts["build_profile"] == "release"
    assert isinstance(facts["cpu_features"], list)
    assert isinstance(facts["cupy"]["available"], bool)


def test_console_script_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "moecore.cli", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "moecore" in proc.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out.lower()
