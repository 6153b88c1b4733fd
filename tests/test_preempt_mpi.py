"""Preemption under ``mpiexec -n 2``: SIGTERM reaches one rank only (rank 1, which writes
nothing); both ranks stop after the same step, rank 0 writes a complete checkpoint, the job
exits 75, and a 2-rank resume continues the uninterrupted 2-rank curve bit-exactly. Run
under MPICH and (CI) Open MPI, like ``test_dist_mpi.py`` whose launch helpers it uses."""

import signal
from pathlib import Path

import pytest
from parallel_harness import Tolerance, assert_runs_agree, cli, mpiexec, read_records
from parallel_harness import entry as cli_entry
from test_preemption import start_and_signal

from moecore.train import checkpoint as ckpt
from moecore.train.preemption import PREEMPTED_EXIT

SETS = ["eval_every=0", "checkpoint_every=1000", "seq_len=32", "batch_size=8"]
SETS += ["param_checksum=true"]  # the resumed run is compared parameter by parameter
#: The resumed run repeats the uninterrupted run's operations in the same order.
BIT_EXACT = Tolerance("bit-exact resumption", loss=0.0, grad_norm=0.0, params=0.0)

pytestmark = [pytest.mark.mpi]


_RANK_VARS = (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of MPI rank ``rank`` among the descendants of ``launcher`` (read from /proc:
    Hydra gives each rank its own session, so the process tree is what ties them; the
    launchers put the rank in each process's environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pid = ancestor = int(entry.name)
            while ancestor > 1 and ancestor != launcher:
                ancestor = _parent(ancestor)
            if ancestor != launcher:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if b"moecore" in cmdline and any(v + str(rank).encode() in env for v in _RANK_VARS):
            return pid
    raise AssertionError(f"no process of rank {rank} under {launcher}")


def test_sigterm_on_one_rank_stops_both_at_the_same_step_and_resumes_bit_exactly(tmp_path, corpus):
    out = tmp_path / "run"
    args = ["train", "--preset", "moe-tiny", "--data", str(corpus), "--dp", "2"]
    cmd = [*mpiexec(2), *cli_entry(), *args, "--out", str(out), "--set", "steps=100000", *SETS]
    code, text = start_and_signal(
        cmd, out, signal.SIGTERM, pid_of=lambda proc: _rank_pid(proc.pid, 1)
    )
    assert code == PREEMPTED_EXIT, text
    assert "on 1 of 2 ranks" in text, text
    done = read_records(out)
    _, state = ckpt.load(ckpt.latest(out))  # complete: every file matches its manifest
    assert state["step"] == len(done) >= 3, (state["step"], len(done))
    total = state["step"] + 3
    cli(2, ["train", "--resume", str(out), "--dp", "2", "--set", f"steps={total}"])
    reference = tmp_path / "reference"
    cli(2, [*args, "--out", str(reference), "--set", f"steps={total}", *SETS])
    assert_runs_agree(read_records(reference), read_records(out), BIT_EXACT)
