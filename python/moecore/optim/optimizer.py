"""``Optimizer``: parameter groups, per-parameter state, and their ``state_dict``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from moecore.autograd.tensor import Tensor


class Optimizer:
    """Base of the optimizers, with PyTorch's conventions.

    Args:
        params: an iterable of Parameters, or of dicts each with a ``"params"`` list and
            hyper-parameters overriding ``defaults`` (parameter groups).
        defaults: hyper-parameters of groups that do not set them.
    """

    #: per-parameter state entries this optimizer keeps (checked when loading a state_dict)
    state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self._check_hyper(self.defaults, "defaults")
        entries = list(params)
        if not entries:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        groups = entries if isinstance(entries[0], dict) else [{"params": entries}]
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[int, dict[str, Any]] = {}
        seen: set[int] = set()
        for group in groups:
            g = {**self.defaults, **group, "params": list(group["params"])}
            unknown = set(g) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"{type(self).__name__}: unknown group options {sorted(unknown)}")
            if not g["params"]:
                raise ValueError(f"{type(self).__name__} got a parameter group with no parameters")
            for p in g["params"]:
                if not isinstance(p, Tensor) or not p.requires_grad:
                    raise TypeError(
                        f"{type(self).__name__} can only optimize tensors that require grad"
                    )
                if id(p) in seen:
                    raise ValueError(
                        f"{type(self).__name__}: a parameter appears in more than one group"
                    )
                seen.add(id(p))
            self._check_hyper(g, f"param group {len(self.param_groups)}")
            self.param_groups.append(g)

    def _check_hyper(self, group: dict[str, Any], where: str) -> None:
        lr = group.get("lr")
        if lr is not None and lr < 0:
            raise ValueError(f"{type(self).__name__}: invalid learning rate {lr} in {where}")
        wd = group.get("weight_decay", 0.0)
        if wd < 0:
            raise ValueError(f"{type(self).__name__}: invalid weight_decay {wd} in {where}")

    def params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        """The group's parameters that received a gradient."""
        return [p for p in group["params"] if p.grad is not None]

    def state_for(self, p: Tensor) -> dict[str, Any]:
        """The state dict of parameter ``p`` (created empty on first use)."""
        return self.state.setdefault(id(p), {})

    def reindex_state(self, p: Tensor, keep: Any) -> None:
        """Keeps only the entries ``keep`` (along the first axis) of ``p``'s state arrays,
        after ``p`` itself was cut the same way (block pruning)."""
        st = self.state.get(id(p))
        if not st:
            return
        for key, value in st.items():
            if hasattr(value, "shape") and value.ndim and value.shape[0] != p.shape[0]:
                st[key] = value[keep].copy()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears every parameter's gradient (drops it, or zeroes it in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad[...] = 0

    def step(self) -> None:
        """Updates the parameters from their gradients."""
        raise NotImplementedError

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [...]}`` with parameters numbered in
        group order, as PyTorch does; arrays are the live state (not copies)."""
        index, state, groups = 0, {}, []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                if id(p) in self.state:
                    state[index] = dict(self.state[id(p)])
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (into the same parameter layout)."""
        groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if groups is None or saved_state is None:
            raise KeyError("optimizer state_dict needs 'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state has {len(groups)} parameter groups, "
                f"this optimizer {len(self.param_groups)}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        for saved, own in zip(groups, self.param_groups):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"a parameter group has {len(saved['params'])} parameters in the saved state "
                    f"but {len(own['params'])} here"
                )
        new_state: dict[int, dict[str, Any]] = {}
        for key, entry in saved_state.items():
            i = int(key)
            if not 0 <= i < len(params):
                raise ValueError(
                    f"optimizer state refers to parameter {i}; there are {len(params)}"
                )
            unknown = set(entry) - set(self.state_keys)
            if unknown:
                raise KeyError(
                    f"{type(self).__name__}: unknown state keys {sorted(unknown)} for parameter {i}"
                )
            p = params[i]
            restored = {}
            for k, v in entry.items():
                if isinstance(v, np.ndarray | Tensor) or hasattr(v, "__array__"):
                    arr = np.asarray(v)  # once: a lazily read array is read here
                    restored[k] = np.array(arr, dtype=p.dtype if arr.dtype.kind == "f" else None)
                else:
                    restored[k] = v
            new_state[id(p)] = restored
        for saved, own in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    own[k] = v
        self.state = new_state
