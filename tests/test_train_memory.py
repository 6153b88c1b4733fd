"""keep_freed_memory: freed training buffers stay mapped, so touching them again is free."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from moecore.train.memory import keep_freed_memory
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        # A step's worth of buffers (20 × 6 MiB), all freed at its end: more than glibc's
        # default trim threshold, so untuned it hands the pages back every time.
        bufs = [np.full(6 << 18, 1.0, np.float32) for _ in range(20)]
        del bufs
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(max(faults[2:]))
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only"
)
def test_reused_buffers_cost_no_page_faults_once_tuned():
    # Untuned, every cycle faults its 120 MiB in again (as 4 KiB or 2 MiB huge pages, so
    # at least 60 faults); tuned, the cycles after the first two reuse warm heap pages.
    plain, tuned = _faults("plain"), _faults("tuned")
    assert plain >= 60, plain
    assert tuned * 10 <= plain, (tuned, plain)
