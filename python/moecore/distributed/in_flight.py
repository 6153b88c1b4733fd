"""Buffers that MPI may still write into: kept alive until their operation completed, and
past ``MPI_Finalize`` if it never did.

A non-blocking operation owns its buffers until it completes, and MPI may deliver into a
receive buffer as late as ``MPI_Finalize``, which mpi4py calls after Python has torn down
its modules. A request that an error left behind (an exception in forward with a stage-3
gather in flight) would otherwise have its buffers freed first: Open MPI then unpacks the
arriving bytes into unmapped memory inside ``MPI_Finalize`` and the process dies of a
segmentation fault after the error it was reporting. So every buffer of an operation in
flight is referenced here, and at exit those still in flight are leaked on purpose: the
process is ending, and the memory goes with it after MPI is done.
"""

from __future__ import annotations

import atexit
import ctypes
from typing import Any

__all__ = ["count", "hold", "release"]

# id(request) -> (request, its buffers): the request is held too, so that its id is not
# reused by another while it is here.
_HELD: dict[int, tuple[object, tuple[Any, ...]]] = {}
_registered = False


def hold(owner: object, buffers: tuple[Any, ...]) -> None:
    """Keeps ``buffers`` alive until :func:`release` (``owner``: the request)."""
    global _registered
    if not _registered:
        atexit.register(_leak_what_is_left)
        _registered = True
    _HELD[id(owner)] = (owner, buffers)


def release(owner: object) -> None:
    """The operation of ``owner`` completed: its buffers are the caller's again."""
    _HELD.pop(id(owner), None)


def count() -> int:
    """How many operations still hold buffers."""
    return len(_HELD)


def _leak_what_is_left() -> None:
    # Runs before the modules (and so _HELD) are torn down; MPI_Finalize comes after that.
    for held in _HELD.values():
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(held))
