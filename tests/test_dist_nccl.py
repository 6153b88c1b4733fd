"""``NCCLGroup``: on a real GPU (skipped here, saying why), and its host-side glue on the CPU
against a stand-in for CuPy's NCCL module that checks every call as NCCL would see it
(element counts, not bytes; NCCL's dtype codes; the stream) and moves the bytes of a
one-rank world."""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest

import moecore.distributed as dist

# --- a stand-in for cupy and cupy.cuda.nccl ---------------------------------------------------

NCCL_CODES = {"NCCL_FLOAT32": 7, "NCCL_FLOAT16": 6, "NCCL_INT64": 4, "NCCL_UINT8": 1}
ITEMSIZE = {7: 4, 6: 2, 4: 8, 1: 1}


class _Ptr:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class DeviceArray(np.ndarray):
    """A numpy array that answers ``.data.ptr`` and ``.get()`` as a CuPy array does."""

    @property
    def data(self):  # type: ignore[override]
        return _Ptr(self.ctypes.data)

    def get(self) -> np.ndarray:
        return np.asarray(self).copy()


def _device(a) -> DeviceArray:
    return np.ascontiguousarray(a).view(DeviceArray)


class _Event:
    done = True

    def synchronize(self) -> None:
        pass


class _Stream:
    ptr = 0xC0FFEE

    def __init__(self) -> None:
        self.synchronized = 0

    def record(self) -> _Event:
        return _Event()

    def synchronize(self) -> None:
        self.synchronized += 1


class _Communicator:
    """NCCL for a world of one rank: checks what it is given, moves the bytes."""

    def __init__(self, size: int, uid: tuple[int, ...], rank: int) -> None:
        assert (size, rank) == (1, 0) and len(uid) == 128
        self.calls: list[tuple] = []

    def allReduce(self, send, recv, count, dtype, op, stream):  # CuPy's name
        self.calls.append(("allReduce", count, dtype, op, stream))
        ctypes.memmove(recv, send, count * ITEMSIZE[dtype])

    def allGather(self, send, recv, count, dtype, stream):  # CuPy's name
        self.calls.append(("allGather", count, dtype, stream))
        ctypes.memmove(recv, send, count * ITEMSIZE[dtype])

    def bcast(self, buf, count, dtype, root, stream):
        self.calls.append(("bcast", count, dtype, root, stream))


@pytest.fixture
def fake_cupy(monkeypatch):
    stream = _Stream()
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.__dict__.update(NCCL_CODES, NCCL_SUM=0, NCCL_MAX=2, NCCL_MIN=3)
    nccl.get_unique_id = lambda: tuple(range(128))
    nccl.NcclCommunicator = _Communicator
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = nccl
    cuda.get_current_stream = lambda: stream
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    cupy.asarray = lambda a, dtype=None: _device(np.asarray(a, dtype=dtype))
    cupy.empty = lambda shape, dtype=np.float32: _device(np.empty(shape, dtype))
    cupy.zeros = lambda shape, dtype=np.float32: _device(np.zeros(shape, dtype))
    for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, module)
    return stream


class _Bootstrap(dist.SingleProcess):
    """A one-rank bootstrap that records aborts and watched waits."""

    def __init__(self) -> None:
        super().__init__()
        self.timeout = 123.0
        self.aborted: list[int] = []
        self.watched: list[str] = []

    def abort(self, code: int = 1) -> None:
        self.aborted.append(code)

    def watch(self, what, timeout=None, limit=None):
        self.watched.append(what)
        return super().watch(what, timeout, limit)


def test_nccl_group_passes_element_counts_and_nccl_types(fake_cupy):
    from moecore.distributed.nccl import NCCLGroup

    boot = _Bootstrap()
    g = NCCLGroup(boot)
    assert (g.rank, g.size, g.timeout) == (0, 1, 123.0)
    buf = _device(np.arange(10, dtype=np.float32))
    g.allreduce(buf, op="max")
    assert g.comm.calls[-1] == ("allReduce", 10, 7, 2, _Stream.ptr)
    np.testing.assert_array_equal(buf, np.arange(10, dtype=np.float32))
    half = _device(np.ones(6, np.float16))
    recv = _device(np.zeros((1, 6), np.float16))
    g.allgather(half, recv)
    assert g.comm.calls[-1] == ("allGather", 6, 6, _Stream.ptr)
    np.testing.assert_array_equal(recv[0], half)
    g.broadcast(_device(np.zeros(3, np.int64)), root=0)
    assert g.comm.calls[-1] == ("bcast", 3, 4, 0, _Stream.ptr)
    # Blocking operations waited for the stream, each under the bootstrap's watchdog.
    assert fake_cupy.synchronized == 2
    assert boot.watched == [
        "NCCL waiting for an all-reduce of 10 float32",
        "NCCL allgather of 6 float16",
        "NCCL broadcast of 3 int64 from rank 0",
    ]


def test_nccl_group_allgatherv_pads_to_the_longest_and_cuts_back(fake_cupy):
    from moecore.distributed.nccl import NCCLGroup

    g = NCCLGroup(_Bootstrap())
    send = _device(np.array([3, 1, 4, 1, 5], np.uint8))
    parts = g.allgatherv(send)
    assert len(parts) == 1
    np.testing.assert_array_equal(parts[0], [3, 1, 4, 1, 5])
    # Lengths first (one int64 per rank), then the padded data.
    assert [c[:3] for c in g.comm.calls] == [("allGather", 1, 4), ("allGather", 5, 1)]


def test_nccl_group_refuses_what_it_cannot_move_and_aborts_through_mpi(fake_cupy):
    from moecore.distributed.nccl import NCCLGroup

    boot = _Bootstrap()
    g = NCCLGroup(boot)
    with pytest.raises(TypeError, match="NCCLGroup cannot move dtype float64"):
        g.allreduce(_device(np.zeros(2, np.float64)))
    with pytest.raises(ValueError, match="op must be 'sum', 'max' or 'min'"):
        g.allreduce(_device(np.zeros(2, np.float32)), op="prod")
    with pytest.raises(NotImplementedError, match="alltoallv"):
        g.alltoallv(_device(np.zeros((1, 2), np.float32)), [1])
    g.abort(3)
    assert boot.aborted == [3]


# --- on a real GPU ------------------------------------------------------------------------------


@pytest.fixture
def cupy_nccl(cupy):
    """CuPy on a GPU (``conftest.cupy``) whose build has NCCL."""
    try:
        from cupy.cuda import nccl  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"CuPy has no NCCL: {exc}")
    return cupy


@pytest.mark.gpu
def test_nccl_group_of_one_gpu_moves_device_arrays(cupy_nccl):
    cupy = cupy_nccl
    from moecore.distributed.nccl import NCCLGroup

    g = NCCLGroup(dist.SingleProcess())
    x = cupy.arange(1000, dtype=cupy.float32)
    g.allreduce(x)
    np.testing.assert_array_equal(x.get(), np.arange(1000, dtype=np.float32))
    recv = cupy.zeros((1, 1000), dtype=cupy.float32)
    g.allgather(x, recv)
    np.testing.assert_array_equal(recv.get()[0], x.get())
    parts = g.allgatherv(cupy.arange(7, dtype=cupy.uint8))
    np.testing.assert_array_equal(parts[0].get(), np.arange(7, dtype=np.uint8))
    b = cupy.full(5, 2, dtype=cupy.int64)
    g.broadcast(b)
    np.testing.assert_array_equal(b.get(), np.full(5, 2))
