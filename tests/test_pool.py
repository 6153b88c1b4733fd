"""moecore.pool from Python: arrays, lifetime, the raw interface, streams, errors, limit."""

import gc
import pickle
import threading

import ml_dtypes
import numpy as np
import pytest

from moecore.errors import PoolMisuse, PoolOutOfMemory
from moecore.pool import HANDLER_NAME, ArenaPool, HostPool, random_trace, replay

try:  # numpy >= 2
    from numpy._core.multiarray import get_handler_name
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import get_handler_name

MIB = 1 << 20


def allocated(pool):
    return pool.stats()["allocated_bytes.all.current"]


def test_empty_is_an_ordinary_writable_numpy_array_backed_by_the_pool():
    pool = HostPool()
    a = pool.empty((3, 5), np.float32)
    assert type(a) is np.ndarray
    assert a.shape == (3, 5) and a.dtype == np.float32
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned and a.flags.owndata
    assert a.base is None
    assert get_handler_name(a) == HANDLER_NAME
    assert get_handler_name(np.empty(3)) != HANDLER_NAME
    assert a.ctypes.data % 512 == 0
    blocks = [b for seg in pool.snapshot() for b in seg["blocks"] if b["allocated"]]
    assert [
        seg["address"] + b["offset"]
        for seg in pool.snapshot()
        for b in seg["blocks"]
        if b["allocated"]
    ] == [a.ctypes.data]
    assert blocks[0]["requested"] == 60
    a[...] = np.arange(15, dtype=np.float32).reshape(3, 5)
    np.testing.assert_array_equal(a.sum(axis=0), np.arange(15).reshape(3, 5).sum(axis=0))
    assert allocated(pool) == 512  # 60 bytes round up to 512
    assert pool.stats()["requested_bytes.all.current"] == 60


def test_default_dtype_is_float64_and_int_shapes_work():
    pool = HostPool()
    a = pool.empty(7)
    assert a.shape == (7,) and a.dtype == np.float64
    b = pool.empty([2, np.int64(3)], "int16")
    assert b.shape == (2, 3) and b.dtype == np.int16


@pytest.mark.parametrize("ndim", [0, 1, 7, 8, 9, 17, 64])
def test_shapes_of_any_rank_match_numpy(ndim):
    # Shapes of up to 8 dimensions are parsed on the stack, longer ones on the heap: both
    # sides of that boundary and numpy's limit of 64.
    shape = tuple((d % 3) + 1 if d < 12 else 1 for d in range(ndim))
    a = HostPool().empty(shape, np.int32)
    ref = np.empty(shape, np.int32)
    assert a.shape == ref.shape and a.strides == ref.strides
    a[...] = np.arange(a.size, dtype=np.int32).reshape(shape)
    assert a.reshape(-1).tolist() == list(range(a.size))


def test_more_than_64_dimensions_are_refused():
    with pytest.raises(PoolMisuse, match="at most 64"):
        HostPool().empty((1,) * 65)


@pytest.mark.parametrize(
    "dtype", ["bool", "int8", "uint64", "float16", "float32", "complex128", ml_dtypes.bfloat16]
)
def test_zeros_matches_numpy_zeros_for_plain_numeric_dtypes(dtype):
    pool = HostPool()
    # Dirty the memory first so zeros() has to clear it.
    junk = pool.empty(1000, np.uint8)
    junk[...] = 0xAB
    del junk
    z = pool.zeros((10, 10), dtype)
    ref = np.zeros((10, 10), dtype)
    assert z.dtype == ref.dtype
    np.testing.assert_array_equal(z.view(np.uint8), ref.view(np.uint8))


_SCALAR_TYPES = [bool, int, float, complex] + [
    getattr(np, n)
    for n in "bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 "
    "float64 complex64 complex128".split()
]


@pytest.mark.parametrize(
    "spelling",
    _SCALAR_TYPES
    + [np.dtype(t) for t in _SCALAR_TYPES]
    + ["f4", ">f4", "<i2", np.dtype(">c8"), np.longdouble, ml_dtypes.bfloat16],
)
def test_every_dtype_spelling_gives_numpys_dtype(spelling):
    # The common spellings are looked up by identity in a table built once; a lookup that
    # returned another entry's descriptor would show here as a different dtype.
    pool = HostPool()
    for _ in range(2):  # the first call may build the table, the second uses it
        a = pool.empty((3, 2), spelling)
        ref = np.empty((3, 2), spelling)
        assert a.dtype == ref.dtype and a.dtype.byteorder == ref.dtype.byteorder
        assert a.strides == ref.strides


def test_large_zeros_are_zero():
    pool = HostPool()
    junk = pool.empty(3 * MIB, np.uint8)
    junk[...] = 7
    del junk
    z = pool.zeros(3 * MIB, np.uint8)
    assert not z.any()


def test_memory_returns_when_the_array_and_every_view_are_gone():
    pool = HostPool()
    a = pool.empty((100, 100))
    row = a[3]
    sliced = a[::7, 2:50]
    transposed = a.T
    reshaped = a.reshape(-1)
    del a
    assert allocated(pool) == 80_384  # 80 000 bytes rounded up to 512
    del row, sliced, transposed
    assert allocated(pool) > 0  # `reshaped` still views it
    reshaped[0] = 1.0
    del reshaped
    assert allocated(pool) == 0
    assert pool.stats()["active_bytes.all.current"] == 0


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_del_order_does_not_matter(order):
    pool = HostPool()
    a = pool.empty(1000)
    objs = [a, a[10:], a[10:][::2]]
    del a
    for i in order:
        objs[i] = None
        gc.collect()
    assert allocated(pool) == 0


def test_pickled_arrays_are_independent_copies():
    pool = HostPool()
    a = pool.empty((4, 4), np.int32)
    a[...] = np.arange(16).reshape(4, 4)
    b = pickle.loads(pickle.dumps(a))
    assert get_handler_name(b) != HANDLER_NAME
    del a
    assert allocated(pool) == 0
    np.testing.assert_array_equal(b, np.arange(16).reshape(4, 4))
    c = pool.empty((4, 4), np.int32)  # may reuse the freed block
    c[...] = -1
    np.testing.assert_array_equal(b, np.arange(16).reshape(4, 4))
    d = pickle.loads(pickle.dumps(c[1:]))  # a pickled view is a copy too
    del c
    assert allocated(pool) == 0
    np.testing.assert_array_equal(d, -np.ones((3, 4)))


def test_arrays_outlive_the_pool_object():
    pool = HostPool()
    a = pool.zeros(1000)
    del pool
    gc.collect()
    a += 1.0
    assert a.sum() == 1000.0
    del a  # frees into the (still alive) pool without error


def test_arrays_may_die_on_another_thread():
    pool = HostPool()
    arrays = [pool.empty(1000 + i) for i in range(64)]

    def drop():
        arrays.clear()

    t = threading.Thread(target=drop)
    t.start()
    t.join()
    assert allocated(pool) == 0


def test_in_place_resize_moves_the_data_within_the_pool():
    pool = HostPool()
    a = pool.empty(1000, np.uint8)
    a[...] = np.arange(1000) % 251
    a.resize(50_000, refcheck=False)
    assert get_handler_name(a) == HANDLER_NAME
    np.testing.assert_array_equal(a[:1000], np.arange(1000) % 251)
    assert allocated(pool) == 50_176  # 50 000 rounded to 512; the old block was freed
    a.resize(10, refcheck=False)
    np.testing.assert_array_equal(a, np.arange(10))
    del a
    assert allocated(pool) == 0


def test_many_threads_making_and_dropping_arrays_keep_the_pool_consistent():
    pool = HostPool()
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            keep = []
            for _ in range(500):
                a = pool.zeros(int(rng.integers(1, 50_000)), np.uint8)
                assert not a.any()
                a[...] = 1
                keep.append(a)
                if len(keep) > 8:
                    keep.pop(int(rng.integers(0, len(keep))))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = pool.stats()
    assert s["allocated_bytes.all.current"] == 0
    assert s["allocation.all.allocated"] == 2000 == s["allocation.all.freed"]


def test_zero_size_arrays_need_no_pool_memory():
    pool = HostPool()
    a = pool.empty((0, 5), np.float32)
    assert a.shape == (0, 5) and a.dtype == np.float32
    assert allocated(pool) == 0


@pytest.mark.parametrize("dtype", [object, "U4", "S3", "V8", "M8[s]", "m8[ns]", [("a", "f4")]])
def test_non_numeric_dtypes_are_refused(dtype):
    with pytest.raises(PoolMisuse, match="plain numeric"):
        HostPool().empty(3, dtype)


def test_bad_shapes_and_dtype_names_are_clear_errors():
    pool = HostPool()
    with pytest.raises(PoolMisuse, match="negative dimensions"):
        pool.empty((2, -1))
    with pytest.raises(PoolMisuse, match="shape must"):
        pool.empty("abc")
    with pytest.raises(PoolMisuse, match="shape must contain ints"):
        pool.empty((2, 1.5))
    with pytest.raises(TypeError):
        pool.empty(3, "not-a-dtype")
    with pytest.raises(PoolOutOfMemory, match="too large"):
        pool.empty((1 << 40, 1 << 40))


def test_raw_malloc_and_free():
    pool = HostPool()
    a = pool.malloc(1000)
    b = pool.malloc(3 * MIB, stream=0, alignment=256)
    assert a % 512 == 0 and b % 512 == 0
    assert allocated(pool) == 1024 + 4 * MIB  # 3 MiB keeps its 4 MiB segment whole
    pool.free(a)
    pool.free(b)
    assert allocated(pool) == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: p.malloc(0), "nbytes must be positive"),
        (lambda p: p.malloc(-3), "nbytes must be positive"),
        (lambda p: p.malloc(8, alignment=3), "power of two"),
        (lambda p: p.malloc(8, alignment=0), "power of two"),
        (lambda p: p.malloc(8, alignment=4096), "exceeds the pool's block alignment 512"),
        (lambda p: p.malloc(8, stream=-1), "stream must be"),
        (lambda p: p.free(12345), "not allocated by this pool"),
        (lambda p: p.free(-1), "not allocated by this pool"),
        (lambda p: p.record_stream(12345, 1), "not allocated by this pool"),
        (lambda p: p.unregister_arena(4096), "no arena"),
        (lambda p: p.register_arena(0, 4096), "base must be a valid address"),
    ],
)
def test_misuse_raises_pool_misuse(call, match):
    with pytest.raises(PoolMisuse, match=match):
        call(HostPool())


def test_double_free_and_foreign_pointer():
    pool, other = HostPool(), HostPool()
    a = pool.malloc(4096)
    keep = pool.malloc(4096)  # keeps the segment alive
    with pytest.raises(PoolMisuse, match="not allocated by this pool"):
        other.free(a)
    with pytest.raises(PoolMisuse, match="not its start"):
        pool.free(a + 512)
    pool.free(a)
    with pytest.raises(PoolMisuse, match="double free"):
        pool.free(a)
    pool.free(keep)


def test_the_memory_of_a_live_array_cannot_be_freed_by_hand():
    pool = HostPool()
    x = pool.empty(100)
    with pytest.raises(PoolMisuse, match="belongs to a numpy array"):
        pool.free(x.ctypes.data)
    x[...] = 2.0
    assert x.sum() == 200.0


def test_streams_follow_the_caching_allocator_rules():
    pool = HostPool()
    a = pool.malloc(4096, stream=1)
    guard = pool.malloc(4096, stream=1)
    pool.free(a)
    b = pool.malloc(4096, stream=2)
    assert b != a, "stream 2 must not reuse a block freed on stream 1"
    c = pool.malloc(4096, stream=1)
    assert c == a
    pool.record_stream(c, 2)
    pool.free(c)
    assert pool.stats()["active_bytes.all.current"] == 3 * 4096  # pending counts as active
    d = pool.malloc(4096, stream=1)
    assert d != a, "a block used by another stream waits for synchronize()"
    pool.synchronize()
    e = pool.malloc(4096, stream=3)
    assert e == a
    blocks = [b for seg in pool.snapshot() for b in seg["blocks"] if b["allocated"]]
    assert sorted(b["stream"] for b in blocks) == [1, 1, 2, 3]
    for x in (guard, b, d, e):
        pool.free(x)
    assert pool.stats()["num_sync_all_streams"] == 1


def test_stats_keys_and_values_follow_torch_memory_stats():
    pool = HostPool()
    a = pool.malloc(1000)
    b = pool.malloc(5 * MIB)
    s = pool.stats()
    assert s["allocated_bytes.all.current"] == 1024 + 6 * MIB
    assert s["allocated_bytes.small_pool.current"] == 1024
    assert s["allocated_bytes.large_pool.current"] == 6 * MIB
    assert s["reserved_bytes.all.current"] == 2 * MIB + 6 * MIB
    assert s["segment.all.current"] == 2
    assert s["allocation.all.current"] == 2
    assert s["inactive_split_bytes.all.current"] == 2 * MIB - 1024
    assert s["inactive_split.all.current"] == 1
    pool.free(b)
    pool.free(a)
    s = pool.stats()
    assert s["allocated_bytes.all.current"] == 0
    assert s["allocated_bytes.all.peak"] == 1024 + 6 * MIB
    assert s["allocation.all.allocated"] == 2 and s["allocation.all.freed"] == 2
    # The freed 1 KiB block waits in stream 0's free cache, not merged yet: it and the rest
    # of its segment are two inactive split blocks until the cache is flushed.
    assert s["inactive_split_bytes.all.current"] == 2 * MIB
    assert s["inactive_split.all.current"] == 2
    pool.synchronize()  # flushes the cache: the segment is one free block again
    s = pool.stats()
    assert s["inactive_split_bytes.all.current"] == 0
    assert s["inactive_split.all.current"] == 0
    pool.reset_peak_stats()
    assert pool.stats()["allocated_bytes.all.peak"] == 0
    assert pool.empty_cache() == 8 * MIB
    s = pool.stats()
    assert s["reserved_bytes.all.current"] == 0
    assert s["num_device_alloc"] == 2 and s["num_device_free"] == 2
    for key in ["num_alloc_retries", "num_ooms", "active_bytes.all.peak"]:
        assert key in s


def test_snapshot_lists_segments_and_blocks_that_tile_them():
    pool = HostPool()
    xs = [pool.malloc(n) for n in (512, 3000, 700_000, 2 * MIB + 1)]
    pool.free(xs[1])
    snap = pool.snapshot()
    assert [s["kind"] for s in snap].count("small") == 1
    assert [s["kind"] for s in snap].count("large") == 1
    for seg in snap:
        assert sum(b["size"] for b in seg["blocks"]) == seg["size"]
        offsets = [b["offset"] for b in seg["blocks"]]
        assert offsets == sorted(offsets) and offsets[0] == 0
    small = next(s for s in snap if s["kind"] == "small")
    # Requests are carved from the end of the free space: the first one sits at the top.
    states = [(b["size"], b["state"]) for b in small["blocks"]]
    assert states[-3:] == [(700_416, "allocated"), (3072, "free"), (512, "allocated")]
    assert states[0][1] == "free"
    # The freed block sits in the stream's free cache (free, not merged yet).
    assert [b["cached"] for b in small["blocks"]][-3:] == [False, True, False]
    assert all(b["cached"] is False for s in snap for b in s["blocks"] if b["state"] != "free")
    allocated_recount = sum(b["size"] for s in snap for b in s["blocks"] if b["allocated"])
    assert allocated_recount == allocated(pool)
    for x in (xs[0], xs[2], xs[3]):
        pool.free(x)


def test_a_freed_array_block_is_reused_by_the_next_array_of_its_size():
    pool = HostPool()
    a = pool.empty((32, 32), np.float32)
    addr = a.ctypes.data
    guard = pool.empty(100, np.uint8)
    del a
    blocks = [b for seg in pool.snapshot() for b in seg["blocks"]]
    cached = [b for b in blocks if b["cached"]]
    assert [(b["size"], b["state"], b["allocated"]) for b in cached] == [(4096, "free", False)]
    assert allocated(pool) == 512
    b = pool.empty(1024, np.int32)  # same rounded size, same stream
    assert b.ctypes.data == addr
    b[:] = np.arange(1024)
    assert b.sum() == 1024 * 1023 // 2
    del b, guard
    assert allocated(pool) == 0
    assert pool.empty_cache() == 2 * MIB


def test_the_limit_raises_a_memory_error_naming_the_numbers():
    pool = HostPool(limit_bytes=8 * MIB)
    a = pool.empty(5 * MIB, np.uint8)
    with pytest.raises(PoolOutOfMemory) as info:
        pool.empty(3 * MIB, np.uint8)
    assert isinstance(info.value, MemoryError)
    msg = str(info.value)
    for n in (3 * MIB, 6 * MIB, 8 * MIB):
        assert str(n) in msg, msg
    assert "requested" in msg and "allocated" in msg and "reserved" in msg and "limit" in msg
    assert pool.stats()["num_ooms"] == 1
    del a
    b = pool.empty(3 * MIB, np.uint8)  # fits once the 6 MiB segment is given back
    assert b.nbytes == 3 * MIB
    assert pool.stats()["reserved_bytes.all.current"] <= 8 * MIB


@pytest.mark.parametrize("limit", [0, -5])
def test_bad_limits_are_refused(limit):
    with pytest.raises(ValueError, match="limit_bytes must be positive"):
        HostPool(limit_bytes=limit)


def test_arena_pool_carves_registered_memory_and_never_frees_it():
    buf = np.zeros(4 * MIB + 512, np.uint8)
    base = buf.ctypes.data
    pool = ArenaPool()
    with pytest.raises(PoolOutOfMemory):
        pool.malloc(512)
    pool.register_arena(base, buf.nbytes)
    with pytest.raises(PoolMisuse, match="overlaps"):
        pool.register_arena(base + 4096, 4096)
    a = pool.malloc(1000)
    b = pool.malloc(2 * MIB, stream=5)
    assert base <= a < base + buf.nbytes and base <= b < base + buf.nbytes
    with pytest.raises(PoolMisuse, match="need a host pool"):
        pool.empty(3)
    with pytest.raises(PoolMisuse, match="still has 2 live"):
        pool.unregister_arena(base)
    pool.free(a)
    pool.free(b)
    assert pool.empty_cache() == 0
    pool.synchronize()
    pool.unregister_arena(base)
    assert pool.stats()["reserved_bytes.all.current"] == 0
    buf[...] = 1  # the memory is still ours


def test_replay_reports_peaks_and_fragmentation():
    trace = [
        ("alloc", 1, 3 * MIB, 0),
        ("alloc", 2, 1000),
        ("free", 1),
        ("alloc", 1, 3 * MIB, 0),
        ("free", 1),
        ("free", 2),
    ]
    r = replay(trace)
    assert r["allocs"] == 3 and r["frees"] == 3
    assert r["peak_allocated"] == 4 * MIB + 1024
    assert r["peak_requested"] == 3 * MIB + 1000
    assert r["peak_reserved"] == 6 * MIB
    assert r["fragmentation"] == pytest.approx(6 * MIB / (4 * MIB + 1024))
    assert replay([])["fragmentation"] is None


@pytest.mark.parametrize(
    ("trace", "match"),
    [
        ([("free", 3)], "event 0 frees id 3, which is not live"),
        ([("alloc", 1, 10, 0), ("alloc", 1, 10, 0)], "event 1 allocates id 1"),
        ([("alloc", 1, 0, 0)], "trace event 0"),
        ([("alloc", 1, -10, 0)], "trace event 0"),
        ([("realloc", 1, 10)], "trace event 0"),
        ([("alloc", 1)], "trace event 0"),
        ([("free",)], "trace event 0"),
        ([5], "trace event 0"),
    ],
)
def test_bad_traces_are_value_errors(trace, match):
    with pytest.raises(ValueError, match=match):
        replay(trace)


def test_random_trace_replays_with_low_fragmentation():
    trace = random_trace(10_000, seed=3)
    assert sum(1 for ev in trace if ev[0] == "alloc") == 10_000
    r = replay(trace)
    assert r["final_allocated"] == 0
    assert r["peak_requested"] < 16000 * MIB
    assert 1.0 <= r["fragmentation"] <= 1.15
    with pytest.raises(ValueError, match="min_size"):
        random_trace(10, min_size=-1)
