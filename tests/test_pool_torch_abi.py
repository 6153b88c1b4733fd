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


def test_an_allocation_is_null_without_a_device_or_freed_with_one():
    malloc, free = abi()
    p = malloc(4096, 0, None)
    if p is not None:  # a machine with a GPU and a CUDA runtime
        free(p, 4096, 0, None)
