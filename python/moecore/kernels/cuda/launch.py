"""What every kernel family shares: the :class:`Backend` seam, the CuPy backend (NVRTC
modules compiled once per device and option set), and the launch-shape and argument checks.

A family module (``topk``, ``codec``, ``adamw``, ``moe``, ``bsr``) validates its inputs,
chooses the launch shape and runs its kernels through a :class:`Backend`:

- :class:`CupyBackend` (the default) compiles each family once per device and option set
  with ``cupy.RawModule`` (lazily, on first use) from the sources shipped in the wheel, with
  ``#line 1 "cuda/<family>.cu"`` prepended, and checks before every launch that each array is
  a C-contiguous CuPy array on the current device and each scalar is ``int32``, ``uint32`` or
  ``float32`` (CuPy itself checks nothing);
- the test suite's CPU emulation provides another backend over numpy arrays, so this exact host
  code is exercised on machines without a GPU.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from moecore.kernels.cuda import sources

# Threads per block for every launch. A multiple of 32: the warp code (ballots, shuffles with
# the full mask, moe_unpermute_backward's warp-uniform guards) needs whole warps. A power of two:
# the kernels compute `blockIdx.x * blockDim.x + threadIdx.x` (unsigned) into an int, and for
# n <= 2^31 - 1 elements a grid of ceil(n / THREADS) blocks ends at thread
# ceil(n / THREADS) * THREADS - 1 <= 2^31 - 1 exactly because THREADS divides 2^31, so that int
# never overflows and the `i >= n` guard holds on the last block. Every count a kernel takes as
# an int is checked below 2^31 first (`check_array`, `int32_count`). At most 256: moe_build_order
# runs in one block of at most MOE_ORDER_TILE = 256 threads.
THREADS = 256
MAX_GRID = 1024  # grid-stride kernels (the top-k histogram) use at most this many blocks
INT_MAX = 2**31 - 1


class Backend(Protocol):
    """Where kernels run: an array module and a checked launch."""

    xp: Any

    def launch(
        self, family: str, name: str, grid: tuple[int, ...], block: tuple[int, ...], *args: Any
    ) -> None:
        """Runs kernel ``name`` of ``family`` over ``grid`` x ``block``."""
        ...

    def to_host(self, a: Any) -> np.ndarray:
        """A numpy copy of device array ``a``."""
        ...


class CupyBackend:
    """Kernels compiled by NVRTC through ``cupy.RawModule``, cached per device and options."""

    def __init__(self, options: tuple[str, ...] = ()) -> None:
        import cupy  # lazy: only the GPU path needs CuPy

        self.xp = cupy
        self.options = options
        self._modules: dict[tuple[str, int, tuple[str, ...]], Any] = {}

    def module(self, family: str) -> Any:
        """The compiled ``cupy.RawModule`` of ``family`` on the current device."""
        device = int(self.xp.cuda.Device().id)
        key = (family, device, self.options)
        mod = self._modules.get(key)
        if mod is None:
            mod = self.xp.RawModule(code=sources.source(family), options=self.options)
            self._modules[key] = mod
        return mod

    def launch(
        self, family: str, name: str, grid: tuple[int, ...], block: tuple[int, ...], *args: Any
    ) -> None:
        """Checks every argument, then launches ``family.name`` on the current stream."""
        device = int(self.xp.cuda.Device().id)
        passed: list[Any] = []
        for i, a in enumerate(args):
            if a is None:
                passed.append(np.uint64(0))  # a null pointer
            elif isinstance(a, self.xp.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{name}: argument {i} is not C-contiguous")
                if int(a.device.id) != device:
                    raise ValueError(
                        f"{name}: argument {i} is on device {a.device.id}, "
                        f"the current device is {device}"
                    )
                passed.append(a)
            elif isinstance(a, np.int32 | np.uint32 | np.float32):
                passed.append(a)
            else:
                raise TypeError(f"{name}: argument {i} is {type(a).__name__}, not a typed scalar")
        self.module(family).get_function(name)(grid, block, tuple(passed))

    def to_host(self, a: Any) -> np.ndarray:
        """``cupy.asnumpy``."""
        return self.xp.asnumpy(a)


_default: CupyBackend | None = None


def default_backend() -> CupyBackend:
    """The process-wide CuPy backend (created on first use)."""
    global _default
    if _default is None:
        _default = CupyBackend()
    return _default


def resolve_backend(backend: Backend | None) -> Backend:
    """``backend``, or the process-wide CuPy backend when it is None."""
    return default_backend() if backend is None else backend


def launch_grid(n: int) -> int:
    """Blocks of :data:`THREADS` threads covering n items (at least one)."""
    return max(1, -(-n // THREADS))


def check_array(be: Backend, a: Any, name: str, dtype: Any, ndim: int | None = None) -> Any:
    """``a`` if it is a C-contiguous array of the backend with this dtype (and ndim)."""
    if not isinstance(a, be.xp.ndarray):
        raise TypeError(f"{name}: expected a {be.xp.__name__} array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")
    if a.size > INT_MAX:
        raise ValueError(f"{name}: {a.size} elements, the GPU kernels index with int32")
    return a


def int32_count(v: int, what: str) -> int:
    """``v`` if the kernels can index it with int32, else a ``ValueError`` naming ``what``;
    called before anything of that size is allocated."""
    if not 0 <= v <= INT_MAX:
        raise ValueError(f"{what} = {v} exceeds the int32 indexing of the GPU kernels (2^31 - 1)")
    return v


def i32(v: int) -> np.int32:
    """``v`` as a kernel's ``int`` argument, checked below 2^31."""
    return np.int32(int32_count(v, "a kernel argument"))
