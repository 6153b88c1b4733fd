"""What ``param_checksum = true`` costs a training step: moe-small's training step against
the step followed by the parameter checksums (float64 sum and sum of squares of every
tensor), in alternating rounds (:func:`_common.paired_times`).

Run:  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/py/checksum.py [--rounds N]

Prints the median step time, the median checksum time and the per-round ratio with its 95 %
interval; the data is a slice of the standard library (no download).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import paired_times

from moecore.train import Trainer, build_config
from moecore.train.checksum import param_checksums


def main() -> None:
    """Runs the comparison and prints it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(os.__file__).parent
        data = Path(tmp) / "corpus.txt"
        data.write_bytes(b"".join(p.read_bytes() for p in sorted(root.glob("[a-c]*.py"))))
        overrides = {"data": str(data), "eval_every": 0, "checkpoint_every": 0}
        trainer = Trainer(
            build_config("moe-small", overrides=overrides), Path(tmp) / "run", out=io.StringIO()
        )

        def step_with_checksums() -> None:
            trainer._train_step()
            param_checksums(trainer.model, trainer.layout)

        got = paired_times(
            {"step": trainer._train_step, "step + checksums": step_with_checksums},
            rounds=args.rounds,
            warmup=1,
        )
        alone = paired_times({"checksums": lambda: param_checksums(trainer.model, trainer.layout)})
    step, both = got["step"], got["step + checksums"]
    print(
        f"moe-small step {step['median_s'] * 1e3:.0f} ms; with checksums "
        f"{both['median_s'] * 1e3:.0f} ms (ratio {both['ratio']:.3f}, 95 % "
        f"{both['ratio_low']:.3f}-{both['ratio_high']:.3f}); checksums alone "
        f"{alone['checksums']['median_s'] * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
