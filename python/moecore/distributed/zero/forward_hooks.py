"""Code run around a module's ``forward`` by several owners (stage 3's ZeROs: the one of
the replicated parameters and the one of the experts hook the same blocks), removable in
any order.

A module hooked at least once has one dispatching ``forward`` in its instance dictionary
and one list of hooks (:data:`_ATTR`); removing the last hook puts back exactly what was
there before (the class's ``forward``, or an instance ``forward`` someone else set).
Hooks nest: the ``before`` of the hook added last runs first and its ``after`` last, as if
each owner had wrapped the ``forward`` it found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["add_forward_hook"]

_ATTR = "_moecore_forward_hooks"
_ABSENT = object()


@dataclass(eq=False)
class _Hook:
    before: Callable[[], None]
    after: Callable[[Any], None]


@dataclass
class _Hooks:
    previous: Any  # the instance ``forward`` found at the first hook, or _ABSENT
    hooks: list[_Hook]


def add_forward_hook(
    module: Any, before: Callable[[], None], after: Callable[[Any], None]
) -> Callable[[], None]:
    """Runs ``before()`` ahead of every call of ``module.forward`` and ``after(output)``
    after it; returns the function that removes this hook (and only it)."""
    table: _Hooks | None = module.__dict__.get(_ATTR)
    if table is None:
        table = _Hooks(module.__dict__.get("forward", _ABSENT), [])
        inner = module.forward  # the instance's, else the class's bound to it
        hooks = table.hooks

        def forward(*args: Any, **kwargs: Any) -> Any:
            for hook in reversed(hooks):
                hook.before()
            out = inner(*args, **kwargs)
            for hook in hooks:
                hook.after(out)
            return out

        object.__setattr__(module, _ATTR, table)
        object.__setattr__(module, "forward", forward)
    hook = _Hook(before, after)
    table.hooks.append(hook)

    def remove() -> None:
        if hook not in table.hooks:
            return
        table.hooks.remove(hook)
        if table.hooks:
            return
        object.__delattr__(module, _ATTR)
        if table.previous is _ABSENT:
            object.__delattr__(module, "forward")
        else:
            object.__setattr__(module, "forward", table.previous)

    return remove
