"""The memory pool: a caching allocator in the manner of PyTorch's, CuPy's and RMM's.

Requests round up to 512 bytes. Small ones (up to 1 MiB) share 2 MiB segments; larger ones
get segments of their own (rounded to 2 MiB) that later serve other large requests. Free
blocks are found by a two-level segregated fit (O(1), within 1/16 of the best fit), split,
and merged with free neighbours when freed.

A freed small block first goes to a short per-stream, per-size cache (like glibc's tcache),
so the next request of the same size on the same stream gets it back at once. Cached blocks
are free for every statistic (not allocated, not active; counted in ``inactive_split``) and
appear in :meth:`HostPool.snapshot` as free blocks with ``"cached": True``; they are merged
with their free neighbours when the cache is flushed, which happens before the pool would
reserve a new segment, on ``synchronize()`` and on ``empty_cache()``.

Streams work as in PyTorch's caching allocator: a block freed on stream ``s`` is reused
only by requests on ``s`` until :meth:`HostPool.synchronize` declares all queued work done;
:meth:`HostPool.record_stream` marks a block as used by another stream too, and once freed
it is not reused at all until ``synchronize()``. Host arrays use stream 0.

Example::

    from moecore.pool import HostPool
    pool = HostPool(limit_bytes=1 << 30)
    x = pool.empty((1024, 1024), "float32")   # an ordinary numpy array
    y = x[::2]                                # views keep the memory alive too
    del x, y                                  # ... and now it is back in the pool
    pool.stats()["allocated_bytes.all.current"]   # 0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from moecore import _core
from moecore.errors import PoolOutOfMemory

__all__ = [
    "HANDLER_NAME",
    "ArenaAllocator",
    "ArenaPool",
    "HostPool",
    "kernel_cache_info",
    "random_trace",
    "release_kernel_cache",
    "replay",
    "set_kernel_cache_limit",
    "torch_cuda_allocator",
    "use_for_cupy",
]

#: The numpy memory-handler name of pool arrays (``numpy.core.multiarray.get_handler_name``).
HANDLER_NAME = "moecore_pool"


def _check_limit(limit_bytes: int | None) -> int | None:
    if limit_bytes is None:
        return None
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes must be an int or None, got {type(limit_bytes).__name__}")
    if limit_bytes <= 0:
        raise ValueError(f"limit_bytes must be positive or None, got {limit_bytes}")
    return limit_bytes


class HostPool(_core.PoolCore):
    """A pool of host memory handing out numpy arrays and raw addresses.

    Args:
        limit_bytes: the most memory the pool may reserve (segments it holds, in use or
            cached). A request that would exceed it first gives cached segments back, then
            raises :class:`moecore.errors.PoolOutOfMemory` (a ``MemoryError``) naming the
            request, the allocated and reserved bytes and the limit. ``None``: no limit.

    Arrays from :meth:`empty` and :meth:`zeros` are ordinary C-contiguous numpy arrays that
    own their data (``flags.owndata``) through a numpy memory handler (NEP 49) named
    ``"moecore_pool"``: views keep the array alive, and the memory returns to the pool when
    the array and every view of it are gone, on any thread; the pool itself lives until its
    last array does. Pickling such an array pickles a copy of the data, which is independent
    of the pool. A zero-size array needs no memory and is a plain numpy array.

    Methods (implemented in Rust):
        ``empty(shape, dtype=None)``, ``zeros(shape, dtype=None)``: arrays (default float64;
        dtype must be plain numeric: bool, ints, floats, complex, or ml_dtypes' types).
        ``malloc(nbytes, stream=0, alignment=512) -> int`` and ``free(address)``: the raw
        interface (blocks are 512-byte aligned; an address stays valid until freed or until
        the pool object and all its arrays are gone, which releases every segment). Freeing
        twice, freeing an address the pool did not hand out, or freeing the memory of a live
        array raises
        :class:`moecore.errors.PoolMisuse` (a ``ValueError``); so do a size that is not
        positive and an alignment that is not a power of two (or is above 512).
        ``record_stream(address, stream)``, ``synchronize()``: stream safety, see the module.
        ``stats()``: ``torch.cuda.memory_stats()``-style flat keys,
        ``"<stat>.<pool>.<field>"`` with stat in allocation, segment, active,
        inactive_split, allocated_bytes, reserved_bytes, active_bytes,
        inactive_split_bytes, requested_bytes; pool in all, small_pool, large_pool; field
        in current, peak, allocated, freed; plus num_alloc_retries, num_ooms,
        num_sync_all_streams, num_device_alloc, num_device_free.
        ``reset_peak_stats()``, ``empty_cache() -> int`` (bytes given back),
        ``snapshot()``: a list of segments ``{"address", "size", "kind", "blocks"}``, each
        block ``{"offset", "size", "requested", "state", "allocated", "stream", "cached"}``
        (``stream`` is None for free blocks any stream may reuse; ``cached`` marks a free
        block held in its stream's free cache, see the module).
        ``register_arena(base, size)`` / ``unregister_arena(base)``: let the pool carve from
        host memory you own (it never frees it).
    """

    def __new__(cls, limit_bytes: int | None = None) -> HostPool:
        return super().__new__(cls, "host", _check_limit(limit_bytes))

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"HostPool(limit_bytes={self.limit_bytes}, "
            f"allocated={s['allocated_bytes.all.current']}, "
            f"reserved={s['reserved_bytes.all.current']})"
        )


class ArenaPool(_core.PoolCore):
    """A pool that only carves memory registered with ``register_arena(base, size)``.

    This is the pool for memory obtained elsewhere (CuPy device allocations, pinned host
    buffers): the pool keeps its bookkeeping on the host and never touches, frees or
    grows the memory itself. ``malloc(nbytes, stream=0)`` returns an address inside an
    arena or raises :class:`moecore.errors.PoolOutOfMemory` when none fits; ``free``,
    ``record_stream``, ``synchronize``, ``stats``, ``snapshot``, ``reset_peak_stats`` work as
    in :class:`HostPool`. ``empty``/``zeros`` are not available (the memory may not be host
    memory). ``unregister_arena(base)`` hands an arena back once it has no live block.

    Args:
        limit_bytes: as in :class:`HostPool`.
    """

    def __new__(cls, limit_bytes: int | None = None) -> ArenaPool:
        return super().__new__(cls, "arenas", _check_limit(limit_bytes))


_SEGMENT = 2 << 20


class ArenaAllocator:
    """An allocator over an :class:`ArenaPool` that grows by arenas obtained on demand.

    Each request is served from the pool on the caller's stream; when no arena has room, a new
    arena of ``max(arena_bytes, request rounded up to 2 MiB)`` bytes is obtained from
    ``obtain_arena(size) -> (base, owner)`` (``owner`` keeps the memory alive) and registered.
    The returned object comes from ``wrap(address, size, release)``; calling ``release()``
    (CuPy: when the last array using the memory dies) gives the block back to the pool.

    :func:`use_for_cupy` builds one over CuPy device memory; tests build one over host memory.
    """

    def __init__(
        self,
        obtain_arena: Callable[[int], tuple[int, Any]],
        wrap: Callable[[int, int, Callable[[], None]], Any],
        current_stream: Callable[[], int] = lambda: 0,
        arena_bytes: int = 64 << 20,
        limit_bytes: int | None = None,
    ) -> None:
        if isinstance(arena_bytes, bool) or not isinstance(arena_bytes, int) or arena_bytes <= 0:
            raise ValueError(f"arena_bytes must be a positive int, got {arena_bytes!r}")
        self.pool = ArenaPool(limit_bytes)
        self.arena_bytes = arena_bytes
        self._obtain = obtain_arena
        self._wrap = wrap
        self._stream = current_stream
        self.arenas: dict[int, tuple[int, Any]] = {}  # base -> (size, owner)

    def malloc(self, nbytes: int) -> Any:
        """A block of at least ``nbytes`` on the current stream, wrapped (None for 0 bytes)."""
        if nbytes == 0:
            return self._wrap(0, 0, lambda: None)
        stream = int(self._stream())
        try:
            address = self.pool.malloc(nbytes, stream)
        except PoolOutOfMemory:
            self._grow(nbytes)
            address = self.pool.malloc(nbytes, stream)
        released = False

        def release() -> None:
            nonlocal released
            if not released:  # idempotent: a finalizer may run after an explicit release
                released = True
                self.pool.free(address)

        return self._wrap(address, nbytes, release)

    def _grow(self, nbytes: int) -> None:
        size = max(self.arena_bytes, -(-nbytes // _SEGMENT) * _SEGMENT)
        limit = self.pool.limit_bytes
        if limit is not None and sum(s for s, _ in self.arenas.values()) + size > limit:
            raise PoolOutOfMemory(
                f"a {nbytes}-byte request needs a new {size}-byte arena, which would exceed "
                f"limit_bytes = {limit}"
            )
        base, owner = self._obtain(size)
        self.pool.register_arena(base, size)
        self.arenas[base] = (size, owner)

    def release_unused_arenas(self) -> int:
        """Unregisters (and drops) every arena with no live block; returns the bytes freed."""
        freed = 0
        for base, (size, _owner) in list(self.arenas.items()):
            try:
                self.pool.unregister_arena(base)
            except ValueError:  # still has live blocks
                continue
            del self.arenas[base]
            freed += size
        return freed

    def stats(self) -> dict[str, int]:
        """The pool's statistics (see :class:`HostPool`)."""
        return self.pool.stats()


def use_for_cupy(arena_bytes: int = 64 << 20, limit_bytes: int | None = None) -> ArenaAllocator:
    """Installs moecore's pool as CuPy's allocator (``cupy.cuda.set_allocator``).

    Arenas of ``arena_bytes`` come from ``cupy.cuda.Memory`` (plain ``cudaMalloc``, outside
    CuPy's own pool) and are registered with an :class:`ArenaPool`; blocks are handed out on
    CuPy's current stream and return to the pool when the last array using them dies.
    Returns the allocator (for ``stats()``); restore CuPy's pool with
    ``cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)``.
    """
    import cupy  # lazy: only the GPU path needs CuPy

    device = cupy.cuda.Device().id

    def obtain(size: int) -> tuple[int, Any]:
        mem = cupy.cuda.Memory(size)
        return int(mem.ptr), mem

    class _PoolMemory(cupy.cuda.UnownedMemory):
        """Device memory of a pool block: gives the block back when CuPy drops it."""

        def __init__(self, ptr: int, size: int, owner: Any, release: Callable[[], None]) -> None:
            super().__init__(ptr, size, owner, device)
            self._release = release

        def __del__(self) -> None:
            self._release()

    def wrap(address: int, size: int, release: Callable[[], None]) -> Any:
        mem = _PoolMemory(address, size, allocator, release)
        return cupy.cuda.MemoryPointer(mem, 0)

    allocator = ArenaAllocator(
        obtain,
        wrap,
        current_stream=lambda: int(cupy.cuda.get_current_stream().ptr),
        arena_bytes=arena_bytes,
        limit_bytes=limit_bytes,
    )
    cupy.cuda.set_allocator(allocator.malloc)
    return allocator


#: The C ABI of the extension for PyTorch's ``CUDAPluggableAllocator`` (rust/pool/pluggable.rs).
TORCH_ALLOC_SYMBOLS = ("moecore_cuda_malloc", "moecore_cuda_free")


def torch_cuda_allocator() -> Any:
    """moecore's pool as a PyTorch CUDA allocator: one pool per device growing by 64 MiB
    arenas from ``cudaMalloc`` (the CUDA runtime is loaded at run time), blocks reused per
    stream. Install it before PyTorch allocates anything on the GPU::

        torch.cuda.memory.change_current_allocator(moecore.pool.torch_cuda_allocator())
    """
    import torch  # lazy: optional, and only for this

    return torch.cuda.memory.CUDAPluggableAllocator(_core.__file__, *TORCH_ALLOC_SYMBOLS)


def replay(trace: Iterable[Sequence[Any]]) -> dict[str, Any]:
    """Replays an allocation trace on a fresh pool and reports its memory use.

    Args:
        trace: events ``("alloc", id, size, stream)`` (``stream`` may be omitted: 0) and
            ``("free", id)``; ids name allocations and may be reused after their free.

    Returns:
        ``{"allocs", "frees", "peak_allocated", "peak_requested", "peak_reserved",
        "fragmentation", "final_allocated", "segments_obtained"}`` where fragmentation is
        ``peak_reserved / peak_allocated`` (None if nothing was allocated). The replay runs
        over a simulated address space: no memory is touched, so traces of any size replay.

    Raises:
        ValueError: a malformed event, a free of an id that is not live, an alloc of an id
            that is live; the message names the event's index.
    """
    return _core.pool_replay(trace)


def random_trace(
    n_allocations: int,
    min_size: int = 1024,
    max_size: int = 64 << 20,
    max_live_bytes: int = 16000 << 20,
    seed: int = 0,
) -> list[tuple[Any, ...]]:
    """RMM's random-allocation workload as a trace for :func:`replay`.

    ``2 * n_allocations`` steps; each draws a size uniformly in ``[min_size, max_size]`` and
    allocates it with probability 0.73 (while fewer than ``n_allocations`` were made and the
    live bytes stay under ``max_live_bytes``), else frees a uniformly chosen live
    allocation. What is live at the end is freed. Deterministic for a given ``seed``.
    """
    for name, v in [
        ("n_allocations", n_allocations),
        ("min_size", min_size),
        ("max_size", max_size),
        ("max_live_bytes", max_live_bytes),
        ("seed", seed),
    ]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return _core.pool_random_trace(n_allocations, min_size, max_size, max_live_bytes, seed)


def kernel_cache_info() -> dict[str, int]:
    """What the kernels' buffer cache holds: ``kept_bytes``, ``kept_blocks``, ``limit_bytes``,
    ``min_bytes``, ``hits`` and ``misses``.

    moecore's Rust kernels allocate their outputs (MoE activations, attention probabilities,
    gradients) through an allocator that keeps freed blocks of ``min_bytes`` (1 MiB) or more,
    up to ``limit_bytes`` in all, for the next request of about the same size: from the second
    training step on, a step's buffers come back without page faults. The limit is 512 MiB
    unless the environment variable ``MOECORE_KERNEL_CACHE_MB`` sets it when moecore is
    imported (0 turns the cache off); numpy's own arrays are not affected.
    """
    return dict(_core.kernel_cache_info())


def release_kernel_cache() -> None:
    """Returns every block the kernels' buffer cache keeps to the system (as
    ``torch.cuda.empty_cache()`` does for PyTorch's)."""
    _core.kernel_cache_release()


def set_kernel_cache_limit(limit_bytes: int) -> None:
    """Sets how many freed bytes the kernels' buffer cache may keep (0 turns it off),
    releasing what is over the new limit at once."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be 0 or more, got {limit_bytes}")
    _core.kernel_cache_set_limit(limit_bytes)
