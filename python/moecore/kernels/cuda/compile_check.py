"""Compile every CUDA kernel with NVRTC, as ``cupy.RawModule`` would, without a GPU.

``moecore check-cuda [--arch sm_80 sm_90]`` compiles each family of
``cuda/`` to a cubin per architecture with CuPy's own compiler options
(``cupy._core.core.assemble_cupy_compiler_options``) plus ptxas verbosity, spill warnings and
warnings-as-errors, prints a table (kernel x arch: registers, shared memory, spills) and
exits non-zero on any error or warning. Only CuPy's NVRTC binding is used: CuPy's public
compile calls need a device, this does not.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from moecore.errors import CompileFailure
from moecore.kernels.cuda import sources

PTXAS_FLAGS = (
    "--ptxas-options=-v",
    "--ptxas-options=--warn-on-spills",
    "--ptxas-options=--warning-as-error",
)
DEFAULT_ARCHS = ("sm_80", "sm_90")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelStats:
    """What ptxas reports for one kernel on one architecture."""

    family: str
    kernel: str
    arch: str
    registers: int = 0
    shared_bytes: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse_ptxas_log(log: str, family: str, arch: str) -> list[KernelStats]:
    """The per-kernel statistics in an NVRTC log compiled with ``--ptxas-options=-v``."""
    stats: list[KernelStats] = []
    current: KernelStats | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = KernelStats(family, m.group(1), m.group(2))
            stats.append(current)
        elif current is not None and (m := _SPILLS.search(line)):
            current.stack_bytes, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            if smem := _SMEM.search(line):
                current.shared_bytes = int(smem.group(1))
    for s in stats:
        if s.arch != arch:
            raise CompileFailure(f"{family}: ptxas compiled {s.kernel} for {s.arch}, not {arch}")
    return stats


def compiler_options(arch: str) -> list[str]:
    """CuPy's options for a RawModule, the target architecture and the ptxas flags."""
    from cupy._core import core  # lazy: CuPy is an optional dependency

    return [*core.assemble_cupy_compiler_options(()), f"-arch={arch}", *PTXAS_FLAGS]


def compile_family(family: str, arch: str) -> tuple[list[KernelStats], bytes]:
    """Compiles one family to a cubin; returns the kernels' statistics and the cubin."""
    from cupy.cuda import nvrtc

    src = sources.source(family)
    prog = nvrtc.createProgram(src, f"cuda/{family}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, compiler_options(arch))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog).rstrip("\x00")
            raise CompileFailure(f"{family} for {arch}: {exc}\n{log}") from exc
        log = nvrtc.getProgramLog(prog).rstrip("\x00")
        if re.search(r"warning", log, re.IGNORECASE):
            raise CompileFailure(f"{family} for {arch}: warnings\n{log}")
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    stats = parse_ptxas_log(log, family, arch)
    expected = set(sources.kernel_names(family))
    if {s.kernel for s in stats} != expected:
        raise CompileFailure(
            f"{family} for {arch}: ptxas reported {sorted(s.kernel for s in stats)}, "
            f"the source declares {sorted(expected)}"
        )
    return stats, cubin


def compile_all(archs: tuple[str, ...] = DEFAULT_ARCHS) -> list[KernelStats]:
    """Compiles every family for every architecture; raises on the first failure."""
    out: list[KernelStats] = []
    for family in sources.families():
        for arch in archs:
            out.extend(compile_family(family, arch)[0])
    return sorted(out, key=lambda s: (s.family, s.kernel, s.arch))


def format_table(stats: list[KernelStats]) -> str:
    """A plain-text table: one row per kernel and architecture."""
    head = ("family", "kernel", "arch", "regs", "smem B", "stack B", "spill st", "spill ld")
    rows = [
        (
            s.family,
            s.kernel,
            s.arch,
            str(s.registers),
            str(s.shared_bytes),
            str(s.stack_bytes),
            str(s.spill_stores),
            str(s.spill_loads),
        )
        for s in stats
    ]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)


def check(archs: tuple[str, ...] = DEFAULT_ARCHS) -> int:
    """``moecore check-cuda``: compile, print the table; 1 on any failure or spill, else 0."""
    try:
        stats = compile_all(archs)
    except CompileFailure as exc:
        print(f"CUDA compile failed: {exc}", file=sys.stderr)
        return 1
    print(format_table(stats))
    spilled = [s for s in stats if s.spill_stores or s.spill_loads]
    if spilled:
        print(f"spills in {[(s.kernel, s.arch) for s in spilled]}", file=sys.stderr)
        return 1
    print(f"{len(stats)} kernel builds, no warnings, no spills")
    return 0
