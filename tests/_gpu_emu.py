"""Runs moecore's CUDA kernels on the CPU: the sources shipped in the installed wheel
(``moecore.kernels.cuda.sources``) are compiled unchanged with g++ and the shim header
``gpu_emu/cuda_emu.h`` (one OS thread per CUDA thread, blocks in turn) into one shared
library per family, cached in the temp directory, and called through ctypes with CuPy's
RawKernel convention: ``kernel(grid, block, args)``, arrays by pointer, scalars as
``numpy.int32`` / ``numpy.uint32`` / ``numpy.float32``.

``MOECORE_EMU_SANITIZER=thread`` or ``address`` builds with ThreadSanitizer or
AddressSanitizer; the process must then have the sanitizer runtime preloaded
(``LD_PRELOAD=$(g++ -print-file-name=libtsan.so)``), as ``.ci/run`` does.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from moecore.kernels.cuda import sources

HERE = Path(__file__).resolve().parent
HEADER = HERE / "gpu_emu" / "cuda_emu.h"
SANITIZER = os.environ.get("MOECORE_EMU_SANITIZER", "")
CACHE = Path(tempfile.gettempdir()) / "moecore-gpu-emu"

_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
_SANITIZER_FLAGS = {
    "": [],
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address", "-fno-omit-frame-pointer"],
}

_REGISTRY_HEAD = """
#include <cstring>
#include <type_traits>
#include <utility>
namespace emu_registry {
template <class... P, std::size_t... I>
void call(void (*k)(P...), dim3 g, dim3 b, void** a, std::index_sequence<I...>) {
    ::emu::launch(k, g, b, *static_cast<std::remove_cv_t<P>*>(a[I])...);
}
template <class... P>
void call(void (*k)(P...), dim3 g, dim3 b, void** a) {
    call(k, g, b, a, std::index_sequence_for<P...>{});
}
template <class... P>
constexpr int arity(void (*)(P...)) { return sizeof...(P); }
}  // namespace emu_registry
extern "C" int emu_arity(const char* name) {
"""


def gxx() -> str:
    """Path of g++ (the harness needs it)."""
    path = shutil.which("g++")
    if path is None:
        raise RuntimeError("the CUDA emulation needs g++ on PATH")
    return path


def translation_unit(src: str) -> str:
    """The C++ file: the shim, the unchanged kernel source, and a name -> launcher table."""
    names = _KERNEL.findall(src)
    arity = "".join(
        f'    if (!std::strcmp(name, "{n}")) return emu_registry::arity(&{n});\n' for n in names
    )
    launch = "".join(
        f'    if (!std::strcmp(name, "{n}")) {{ emu_registry::call(&{n}, g, b, args); return 0; }}\n'
        for n in names
    )
    return (
        f'#include "{HEADER}"\n{src}\n{_REGISTRY_HEAD}{arity}    return -1;\n}}\n'
        'extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,\n'
        "                          unsigned bx, unsigned by, unsigned bz, void** args) {\n"
        "    const dim3 g(gx, gy, gz), b(bx, by, bz);\n"
        f"{launch}    return -1;\n}}\n"
    )


def build(family: str, sanitizer: str = SANITIZER, src: str | None = None) -> Path:
    """Compiles a family (or the given source) into a shared library; cached by content."""
    if sanitizer not in _SANITIZER_FLAGS:
        raise ValueError(f"MOECORE_EMU_SANITIZER must be one of {list(_SANITIZER_FLAGS)}")
    text = translation_unit(sources.source(family) if src is None else src)
    flags = [
        "-std=c++20",
        "-O1",
        "-g",
        "-fPIC",
        "-shared",
        "-pthread",
        "-ffp-contract=off",
        "-Wall",
        "-Werror",
        *_SANITIZER_FLAGS[sanitizer],
    ]
    key = hashlib.sha256("\0".join([text, HEADER.read_text(), *flags, gxx()]).encode()).hexdigest()[
        :16
    ]
    lib = CACHE / f"{family}-{sanitizer or 'plain'}-{key}.so"
    if lib.exists():
        return lib
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cpp = Path(tmp) / f"{family}.cpp"
        cpp.write_text(text)
        out = Path(tmp) / "lib.so"
        # The compiler must not inherit a sanitizer runtime preloaded into this process.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        proc = subprocess.run(
            [gxx(), *flags, str(cpp), "-o", str(out)],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed for {family}:\n{proc.stderr}")
        os.replace(out, lib)  # atomic: concurrent builders agree on the result
    return lib


class Kernel:
    """One emulated kernel, called like ``cupy.RawKernel``: ``k(grid, block, args)``."""

    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self._lib = lib
        self.name = name
        self.arity = lib.emu_arity(name.encode())
        if self.arity < 0:
            raise KeyError(name)

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple) -> None:
        if len(args) != self.arity:
            raise TypeError(f"{self.name} takes {self.arity} arguments, got {len(args)}")
        holders: list[ctypes._SimpleCData] = []
        for i, a in enumerate(args):
            if a is None:
                holders.append(ctypes.c_void_p(None))
            elif isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: argument {i} is not C-contiguous")
                holders.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int32):
                holders.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.uint32):
                holders.append(ctypes.c_uint32(int(a)))
            elif isinstance(a, np.float32):
                holders.append(ctypes.c_float(float(a)))
            else:
                raise TypeError(f"{self.name}: argument {i} is {type(a).__name__}, not typed")
        packed = (ctypes.c_void_p * len(holders))(*(ctypes.addressof(h) for h in holders))
        g = (*grid, 1, 1, 1)[:3]
        b = (*block, 1, 1, 1)[:3]
        if self._lib.emu_launch(self.name.encode(), *g, *b, packed) != 0:
            raise KeyError(self.name)
        buf = ctypes.create_string_buffer(256)
        if self._lib.emu_take_fault(buf, len(buf)):
            raise RuntimeError(f"{self.name}: {buf.value.decode()} (undefined on a GPU)")


class Module:
    """The emulated kernels of one family, like ``cupy.RawModule.get_function``."""

    def __init__(self, family: str, sanitizer: str = SANITIZER, src: str | None = None) -> None:
        lib = ctypes.CDLL(str(build(family, sanitizer, src)))
        lib.emu_arity.argtypes = [ctypes.c_char_p]
        lib.emu_arity.restype = ctypes.c_int
        lib.emu_launch.argtypes = [ctypes.c_char_p, *[ctypes.c_uint] * 6, ctypes.c_void_p]
        lib.emu_launch.restype = ctypes.c_int
        lib.emu_take_fault.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.emu_take_fault.restype = ctypes.c_int
        self._lib = lib

    def get_function(self, name: str) -> Kernel:
        """The kernel ``name`` of this family."""
        return Kernel(self._lib, name)


class EmuBackend:
    """A ``moecore.kernels.cuda.Backend`` over numpy arrays and emulated kernels, so the GPU
    host code runs unchanged on the CPU."""

    xp = np

    def __init__(self, sanitizer: str = SANITIZER) -> None:
        self.sanitizer = sanitizer
        self._modules: dict[str, Module] = {}
        self.launches: list[str] = []

    def launch(self, family: str, name: str, grid: tuple, block: tuple, *args: object) -> None:
        mod = self._modules.get(family)
        if mod is None:
            mod = self._modules[family] = Module(family, self.sanitizer)
        self.launches.append(name)
        mod.get_function(name)(grid, block, args)

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)
