"""``moecore.pool.ArenaAllocator`` — the bookkeeping behind ``use_for_cupy()`` — over host
memory arenas: growth by arenas, release when the wrapper dies, streams, limits."""

from __future__ import annotations

import gc
import itertools

import numpy as np
import pytest

from moecore.errors import PoolOutOfMemory
from moecore.pool import ArenaAllocator

MiB = 1 << 20


class Block:
    def __init__(self, address, size, release):
        self.address, self.size, self._release = address, size, release

    def __del__(self):
        self._release()


class HostArenas:
    """Arenas of host memory (512-byte aligned views into numpy buffers), with a log."""

    def __init__(self):
        self.obtained = []

    def __call__(self, size):
        buf = np.zeros(size + 512, np.uint8)
        base = buf.ctypes.data
        offset = -base % 512
        self.obtained.append((base + offset, size))
        return base + offset, buf


def make(stream=lambda: 0, **kw):
    arenas = HostArenas()
    return ArenaAllocator(arenas, Block, current_stream=stream, **kw), arenas


def inside(arenas, block):
    return any(
        b <= block.address and block.address + block.size <= b + s for b, s in arenas.obtained
    )


def test_blocks_come_from_arenas_and_never_overlap():
    alloc, arenas = make(arena_bytes=4 * MiB)
    blocks = [alloc.malloc(n) for n in (100, 5000, 70_000, 512, 1)]
    assert len(arenas.obtained) == 1
    assert all(inside(arenas, b) for b in blocks)
    spans = sorted((b.address, b.address + b.size) for b in blocks)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert alloc.stats()["allocation.all.current"] == 5


def test_grows_by_a_new_arena_sized_for_a_large_request():
    alloc, arenas = make(arena_bytes=2 * MiB)
    a = alloc.malloc(MiB)
    b = alloc.malloc(5 * MiB)  # larger than an arena: an arena of its own, rounded to 2 MiB
    assert [s for _, s in arenas.obtained] == [2 * MiB, 6 * MiB]
    assert inside(arenas, a) and inside(arenas, b)


def test_memory_returns_when_the_wrapper_dies_and_is_reused():
    alloc, arenas = make(arena_bytes=2 * MiB)
    a = alloc.malloc(4096)
    first = a.address
    del a
    gc.collect()
    assert alloc.stats()["allocated_bytes.all.current"] == 0
    b = alloc.malloc(4096)
    assert b.address == first
    assert len(arenas.obtained) == 1


def test_a_block_freed_on_one_stream_is_not_reused_on_another_until_synchronize():
    stream = [1]
    alloc, arenas = make(stream=lambda: stream[0], arena_bytes=2 * MiB)
    a = alloc.malloc(4096)
    first = a.address
    del a
    stream[0] = 2
    b = alloc.malloc(4096)
    assert b.address != first
    stream[0] = 1
    assert alloc.malloc(4096).address == first  # same stream: reused at once
    assert all(inside(arenas, blk) for blk in (b,))


def test_limit_is_enforced_before_obtaining_an_arena():
    alloc, arenas = make(arena_bytes=2 * MiB, limit_bytes=4 * MiB)
    keep = [alloc.malloc(MiB + 1), alloc.malloc(MiB + 1)]  # large: a 2 MiB arena each
    with pytest.raises(PoolOutOfMemory, match="limit_bytes"):
        alloc.malloc(MiB + 1)
    assert [s for _, s in arenas.obtained] == [2 * MiB, 2 * MiB]
    assert len(keep) == 2


def test_unused_arenas_are_released():
    alloc, _ = make(arena_bytes=2 * MiB)
    a = alloc.malloc(MiB)
    b = alloc.malloc(3 * MiB)
    del b
    gc.collect()
    assert alloc.release_unused_arenas() == 4 * MiB
    assert len(alloc.arenas) == 1
    assert a.address in {base + off for base in alloc.arenas for off in range(0, 2 * MiB, 512)}


def test_bad_arena_size():
    with pytest.raises(ValueError, match="arena_bytes"):
        make(arena_bytes=0)
