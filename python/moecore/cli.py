"""The ``moecore`` command: a thin argparse layer over library calls."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any


def _format_status(status: dict[str, Any]) -> str:
    if not status.get("available"):
        return f"no ({status.get('reason', 'unavailable')})"
    details = ", ".join(f"{k} {v}" for k, v in status.items() if k != "available")
    return f"yes ({details})"


def _cmd_info(args: argparse.Namespace) -> int:
    from moecore.info import collect  # lazy: keep `moecore --help` fast

    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    rows = [
        ("moecore", facts["moecore"]),
        ("build profile", facts["build_profile"]),
        ("target", facts["target"]),
        ("CPU features", " ".join(facts["cpu_features"]) or "(none detected)"),
        ("CPU cores", f"{facts['cpu_count']} (rayon threads {facts['rayon_threads']})"),
        ("python", facts["python"]),
        ("numpy", facts["numpy"]),
        ("CuPy / GPU", _format_status(facts["cupy"])),
        ("mpi4py / MPI", _format_status(facts["mpi"])),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``moecore``, one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="moecore", description="Mixture-of-Experts training with a Rust core."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser(
        "info", help="show the build, CPU features, numpy, GPU and MPI availability"
    )
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    info.set_defaults(run=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``moecore`` with ``argv`` (default: ``sys.argv[1:]``) and returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
