"""Peak RSS per rank of resuming a sharded (ZeRO) checkpoint, against building the same
trainer fresh, for this tree and (optionally) another one side by side.

Run (release build and the ``mpi`` extra installed)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/zero_resume.py \\
        [--ranks 2] [--stages 1 2 3] [--baseline OTHER_TREE/python]

For each stage it trains ``moe-small`` one step on ``--ranks`` ranks with a checkpoint
(each rank writes its shard), then, in fresh ``mpiexec`` jobs, each rank either builds the
trainer from the run's config (``fresh``: the model and its empty optimizer) or resumes the
checkpoint (``resume``), and reports its peak RSS (``ru_maxrss``). ``resume − fresh`` is
what reading the checkpoint costs a rank: before this tree's lazy read, every rank
assembled the whole model and both AdamW moments (12 bytes per parameter) on top of its
own state; now it reads its own pieces from the memory-mapped shards. Jobs of the trees
alternate, ``--rounds`` times; the medians are reported.
Results go to ``benches/results/zero_resume.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import blas_info, table, write_results


def child(run: Path, mode: str) -> None:
    """In each rank of an mpiexec job: build or resume, print this rank's peak RSS."""
    from moecore.train.config import config_from_dict
    from moecore.train.trainer import Trainer

    if mode == "resume":
        trainer = Trainer.resume(run)
    else:
        config = json.loads((run / "config.json").read_text())
        trainer = Trainer(config_from_dict(config), Path(tempfile.mkdtemp()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rank": trainer.group.rank, "peak_rss_mb": peak}), flush=True)


def _mpiexec(p: int, cmd: list[str], env: dict[str, str]) -> str:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    done = subprocess.run(
        [str(mpiexec), "-n", str(p), *cmd], capture_output=True, text=True, env=env, timeout=1800
    )
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="moe-small")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", help="another tree's python/ folder, measured alongside")
    ap.add_argument("--child", nargs=2, metavar=("RUN", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    here = str(Path(__file__).resolve().parents[2] / "python")
    trees = {"this": here, **({"baseline": args.baseline} if args.baseline else {})}
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    peaks: dict[tuple[int, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            run = Path(tmp) / f"z{stage}"
            train = [sys.executable, "-m", "moecore.cli", "train", "--preset", args.preset]
            train += ["--out", str(run), "--dp", str(args.ranks), "--zero", str(stage)]
            train += ["--set", "steps=1", "checkpoint_every=1", "eval_every=0"]
            _mpiexec(args.ranks, train, dict(env, PYTHONPATH=here))
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    for mode in ("fresh", "resume"):
                        cmd = [sys.executable, __file__, "--child", str(run), mode]
                        out = _mpiexec(args.ranks, cmd, dict(env, PYTHONPATH=tree))
                        # The ranks' lines may interleave: take each record by its form.
                        found = re.findall(r'\{"rank": \d+, "peak_rss_mb": [0-9.e+-]+\}', out)
                        ranks = [json.loads(r) for r in found]
                        if len(ranks) != args.ranks:
                            raise SystemExit(f"expected {args.ranks} ranks' figures:\n{out}")
                        worst = max(r["peak_rss_mb"] for r in ranks)
                        peaks.setdefault((stage, name, mode), []).append(worst)
    rows, results = [], []
    for stage in args.stages:
        for name in trees:
            fresh = statistics.median(peaks[(stage, name, "fresh")])
            resume = statistics.median(peaks[(stage, name, "resume")])
            rows.append([stage, name, f"{fresh:.0f}", f"{resume:.0f}", f"{resume - fresh:.0f}"])
            results.append({"stage": stage, "tree": name, "fresh_mb": fresh, "resume_mb": resume})
    print(f"{args.preset}, {args.ranks} ranks (largest rank's peak RSS, MiB); {blas_info()}")
    print(table(rows, ["stage", "tree", "fresh", "resume", "resume - fresh"]))
    path = write_results("zero_resume", {"args": vars(args), "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
