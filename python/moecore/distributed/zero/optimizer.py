"""``ShardedOptimizer``: an optimizer that updates only this rank's ZeRO pieces."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from moecore.autograd.tensor import Tensor
from moecore.distributed.zero.shards import Piece
from moecore.distributed.zero.wrapper import ZeRO
from moecore.optim import Adafactor, Optimizer

__all__ = ["ShardedOptimizer"]


class ShardedOptimizer(Optimizer):
    """Wraps ``optimizer`` (built over the whole parameters) so that it keeps state for,
    and updates, only the pieces this rank owns under ``zeros`` (parameters no ZeRO takes
    care of are updated whole), then all-gathers the parameters.

    ``param_groups`` are the wrapped optimizer's (a learning-rate schedule sets them);
    :meth:`state_dict` and :meth:`load_state_dict` use the unsharded layout of the wrapped
    optimizer (a collective: call them on every rank), so a checkpoint does not depend on
    the stage or the number of ranks.

    The update must be element-wise (AdamW, SGD): Adafactor's factored second moment needs
    whole matrices and is refused with a ``ValueError``.
    """

    def __init__(self, optimizer: Optimizer, zeros: list[ZeRO]) -> None:
        if isinstance(optimizer, Adafactor):
            raise ValueError(
                "ZeRO needs an element-wise optimizer (AdamW, SGD): Adafactor's factored "
                "second moment needs whole matrices"
            )
        self.full = optimizer
        self.zeros = list(zeros)
        self.defaults = optimizer.defaults
        self.state_keys = optimizer.state_keys
        self.param_groups = optimizer.param_groups
        #: id of a whole parameter → (its ZeRO, its index there).
        self._managed: dict[int, tuple[ZeRO, int]] = {}
        pieces: dict[int, list[Piece]] = {}
        for zero in self.zeros:
            for i, p in enumerate(zero.params):
                self._managed[id(p)] = (zero, i)
            for piece in zero.pieces:
                pieces.setdefault(id(zero.params[piece.index]), []).append(piece)
        self._pieces = pieces
        inner = copy.copy(optimizer)
        inner.param_groups = [
            {**g, "params": [t for p in g["params"] for t in self._local(p)]}
            for g in optimizer.param_groups
        ]
        inner.state = {}
        self.inner = inner
        self.state = inner.state

    def _local(self, p: Tensor) -> list[Tensor]:
        """What this rank updates of whole parameter ``p``."""
        if id(p) not in self._managed:
            return [p]
        return [piece.tensor for piece in self._pieces.get(id(p), [])]

    def step(self) -> None:
        """Updates the owned pieces, then all-gathers the parameters."""
        for own, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in own.items() if k != "params"})
        self.inner.step()
        for zero in self.zeros:
            zero.gather_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears every gradient: the pieces', the parameters' and the ZeROs' parts."""
        self.inner.zero_grad(set_to_none)
        self.full.zero_grad(set_to_none)
        for zero in self.zeros:
            zero.zero_grad()

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` as one process would have it: every
        parameter's whole state (gathered; a collective over every ZeRO's group)."""
        gathered = {
            id(zero): zero.gather_state(lambda piece: self.inner.state.get(id(piece.tensor), {}))
            for zero in self.zeros
        }
        whole: dict[int, dict[str, Any]] = {}
        for p in (p for g in self.param_groups for p in g["params"]):
            if id(p) in self._managed:
                zero, i = self._managed[id(p)]
                if i in gathered[id(zero)]:
                    whole[id(p)] = gathered[id(zero)][i]
            elif id(p) in self.inner.state:
                whole[id(p)] = self.inner.state[id(p)]
        self.full.state = whole
        try:
            return self.full.state_dict()
        finally:
            self.full.state = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a ``state_dict`` of the unsharded layout: each rank keeps its pieces. An
        array may be any object with ``shape`` and ``read(lo, hi)`` (a resumed sharded
        checkpoint's :class:`~moecore.train.sharded_checkpoint.Assembled`): only this
        rank's pieces are read, so the whole state never exists on one rank."""
        params = [p for g in self.param_groups for p in g["params"]]
        managed = {i for i, p in enumerate(params) if id(p) in self._managed}
        # The unsharded optimizer checks indices, keys and groups; the managed parameters'
        # arrays reach it as empty placeholders and are cut here, piece by piece.
        saved = state_dict.get("state")
        entries: dict[int, dict[str, Any]] = {}
        if isinstance(saved, dict):
            for key, entry in saved.items():
                i = _index(key)
                if i in managed and isinstance(entry, dict):
                    entries[i] = entry
            placeholders = {
                key: {k: _EMPTY if _is_array(v) else v for k, v in entry.items()}
                if _index(key) in entries
                else entry
                for key, entry in saved.items()
            }
            state_dict = {**state_dict, "state": placeholders}
        self.full.load_state_dict(state_dict)
        try:
            state: dict[int, dict[str, Any]] = {}
            for i, p in enumerate(params):
                whole = self.full.state.get(id(p))
                if whole is None:
                    continue
                if id(p) not in self._managed:
                    state[id(p)] = whole
                    continue
                entry = entries[i]
                for k, v in entry.items():
                    if _is_array(v) and int(np.prod(v.shape)) != p.data.size:
                        raise ValueError(
                            f"optimizer state {k!r} of parameter {i} has shape {tuple(v.shape)}; "
                            f"the parameter has {p.data.size} elements"
                        )
                for piece in self._pieces.get(id(p), []):
                    state[id(piece.tensor)] = {
                        k: _cut(entry[k], piece) if _is_array(entry[k]) else v
                        for k, v in whole.items()
                    }
            self.inner.state = self.state = state
        finally:
            self.full.state = {}


_EMPTY = np.zeros(0, dtype=np.float32)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "read")


def _index(key: Any) -> int | None:
    """A saved state's key as a parameter index (None when it is not one: the unsharded
    optimizer then says what is wrong)."""
    try:
        return int(key)
    except (TypeError, ValueError):
        return None


def _cut(value: Any, piece: Piece) -> np.ndarray:
    """The piece's elements of a whole (flattened) state array: read from it alone when it
    can (:class:`~moecore.train.sharded_checkpoint.Assembled`), else sliced and copied."""
    lo, hi = piece.start, piece.start + piece.numel
    if hasattr(value, "read"):
        return np.asarray(value.read(lo, hi), dtype=np.float32)
    return np.asarray(value).reshape(-1)[lo:hi].astype(np.float32, copy=True)
