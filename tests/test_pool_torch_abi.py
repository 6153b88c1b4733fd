"""The C ABI for PyTorch's ``CUDAPluggableAllocator`` is exported by the installed extension
and safe without a GPU (its bookkeeping is tested in Rust, rust/pool/pluggable.rs)."""

from __future__ import annotations

import ctypes

from moecore import _core, pool


def abi():
    lib = ctypes.CDLL(_core.__file__)
    malloc = getattr(lib, pool.TORCH_ALLOC_SYMBOLS[0])
    malloc.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    free = getattr(lib, pool.TORCH_ALLOC_SYMBOLS[1])
    free.restype = None
    free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    return malloc, free


def test_symbols_are_exported_with_pytorchs_signatures():
    malloc, free = abi()
    assert malloc(0, 0, None) is None  # nothing to allocate
    assert malloc(-8, 0, None) is None  # a negative size is refused, not a crash
    free(0x1000, 8, 0, None)  # a pointer the pool never handed out is ignored


def cuda_devices() -> int:
    """CUDA devices the runtime reports (0 without a runtime): found independently of the
    extension, by the same library names it tries."""
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"):
        try:
            rt = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        return count.value if rt.cudaGetDeviceCount(ctypes.byref(count)) == 0 else 0
    return 0


def test_an_allocation_is_null_without_a_device_or_freed_with_one():
    malloc, free = abi()
    p = malloc(4096, 0, None)
    if cuda_devices() == 0:
        assert p is None, "an allocation without a CUDA device must be NULL"
        return
    # A machine with a GPU: a device block (arenas are 512-byte aligned at least).
    assert p is not None and p % 512 == 0, p
    free(p, 4096, 0, None)
