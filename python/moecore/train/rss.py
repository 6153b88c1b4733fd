"""The process's memory as ``metrics.jsonl`` records it each step: resident set size now and
at its peak, in MiB (``VmRSS`` and ``VmHWM`` of Linux's ``/proc/self/status``, the same
counter's current value and high-water mark; empty elsewhere)."""

from __future__ import annotations

_FIELDS = {b"VmRSS:": "rss_mb", b"VmHWM:": "peak_rss_mb"}


def rss_record() -> dict[str, float]:
    """``{"rss_mb": current, "peak_rss_mb": peak}`` for this process; ``{}`` where the
    platform does not tell."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                key = _FIELDS.get(line[:6])
                if key is not None:
                    out[key] = round(int(line.split()[1]) / 1024, 1)  # kB
    except (OSError, IndexError, ValueError):
        return {}
    return out if len(out) == 2 else {}
