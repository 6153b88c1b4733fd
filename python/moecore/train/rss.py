"""The process's memory as ``metrics.jsonl`` records it each step: resident set size now and
at its peak, in MiB (Linux ``/proc/self/statm`` and ``getrusage``; empty elsewhere)."""

from __future__ import annotations

import os
import resource
import sys

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_record() -> dict[str, float]:
    """``{"rss_mb": current, "peak_rss_mb": peak}`` for this process; ``{}`` where the
    platform does not tell."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        with open("/proc/self/statm", "rb") as fh:
            resident_pages = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return {}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "rss_mb": round(resident_pages * _PAGE / 2**20, 1),
        "peak_rss_mb": round(peak_kib / 1024, 1),
    }
