"""Whether operations are recorded on the tape (``moecore.no_grad()`` turns it off)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


def is_grad_enabled() -> bool:
    """True when new operations are recorded for backward (the default, per thread)."""
    return getattr(_state, "enabled", True)


def set_grad_enabled(enabled: bool) -> None:
    """Turns recording on or off for the current thread."""
    _state.enabled = bool(enabled)


@contextmanager
def no_grad() -> Iterator[None]:
    """Context manager: operations inside are not recorded (inference, optimizer steps)."""
    previous = is_grad_enabled()
    set_grad_enabled(False)
    try:
        yield
    finally:
        set_grad_enabled(previous)


@contextmanager
def enable_grad() -> Iterator[None]:
    """Context manager: re-enables recording inside a ``no_grad`` block."""
    previous = is_grad_enabled()
    set_grad_enabled(True)
    try:
        yield
    finally:
        set_grad_enabled(previous)
