"""The CUDA kernel sources shipped in the wheel (embedded in ``moecore._core``).

Each family is one file of ``cuda/`` in the source tree. :func:`source` prepends
``#line 1 "cuda/<family>.cu"`` so that NVRTC's (and g++'s) messages point at the real file.
"""

from __future__ import annotations

import re

from moecore import _core

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def families() -> list[str]:
    """The kernel families (``"topk"``, ``"moe"`` …), sorted."""
    return sorted(_core.cuda_sources())


def source(family: str) -> str:
    """The source of ``cuda/<family>.cu``, with a ``#line`` directive naming that file."""
    sources = _core.cuda_sources()
    if family not in sources:
        raise ValueError(f"no CUDA kernel family {family!r}; known: {sorted(sources)}")
    return f'#line 1 "cuda/{family}.cu"\n{sources[family]}'


def kernel_names(family: str) -> list[str]:
    """The ``extern "C" __global__`` kernels of a family, in source order."""
    return _KERNEL.findall(source(family))
