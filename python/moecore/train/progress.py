"""Progress on a terminal: one live line on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import TextIO


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Shows step, loss, tokens/s, lr, expert-load CV and ETA."""

    def __init__(self, total: int, out: TextIO | None = None, every: int = 10) -> None:
        self.total, self.out = total, out or sys.stdout
        self.live = bool(getattr(self.out, "isatty", lambda: False)())
        self.every = every

    def update(
        self,
        step: int,
        loss: float,
        tokens_per_s: float,
        lr: float,
        cv: float,
        eta_s: float,
        val: float | None = None,
        note: str = "",
    ) -> None:
        """Shows one step (every step on a TTY; every ``every`` steps otherwise)."""
        text = (
            f"step {step:>5}/{self.total}  loss {loss:7.4f}  "
            + (f"val {val:7.4f}  " if val is not None else "")
            + f"tok/s {tokens_per_s:8,.0f}  lr {lr:.2e}  load cv {cv:4.2f}  eta {_eta(eta_s)}"
            + (f"  {note}" if note else "")
        )
        if self.live:
            self.out.write("\r\033[K" + text)
            if val is not None or note:
                self.out.write("\n")
            self.out.flush()
        elif step % self.every == 0 or step == self.total or val is not None or note:
            self.out.write(text + "\n")
            self.out.flush()

    def message(self, text: str) -> None:
        """A line of its own (start, checkpoints, warnings)."""
        if self.live:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        """Ends the live line."""
        if self.live:
            self.out.write("\n")
            self.out.flush()
