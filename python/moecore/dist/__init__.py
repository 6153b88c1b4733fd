"""``moecore.dist``: the former name of :mod:`moecore.distributed` (renamed to PyTorch's word),
kept so that existing code keeps working. ``moecore.dist.X`` and every submodule
``moecore.dist.<module>`` are the very objects of ``moecore.distributed`` — one class per
name, so ``isinstance`` checks and the groups' state agree whichever name imported them."""

from __future__ import annotations

import sys

import moecore.distributed as _distributed
from moecore.distributed import *  # noqa: F403
from moecore.distributed import __all__  # noqa: F401

# The package imports all of its submodules, so aliasing them costs nothing.
for _name, _module in list(sys.modules.items()):
    if _name.startswith(_distributed.__name__ + "."):
        _short = _name[len(_distributed.__name__) + 1 :]
        sys.modules[f"{__name__}.{_short}"] = _module
        if "." not in _short:
            globals()[_short] = _module
del _name, _module, _short
