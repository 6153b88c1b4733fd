"""``moecore`` (``python cli_with_a_bug.py <args>``) with a bug planted: its optimizer raises
an unexpected exception in the second step. Launched as one rank of a job, it shows how the
CLI treats an exception that is nobody's input error: the traceback shown, the job ended."""

from __future__ import annotations

import sys

from moecore import optim
from moecore.cli import main

_real_step = optim.AdamW.step
_steps = 0


def _step(self: optim.AdamW) -> None:
    global _steps
    _steps += 1
    if _steps == 2:
        raise ZeroDivisionError("a planted bug in optimizer step 2")
    _real_step(self)


optim.AdamW.step = _step  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
