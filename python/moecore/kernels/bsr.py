"""Block-sparse (BSR) kernels on arrays: ``y = x @ w.T (+ bias)``, ``dx = dy @ w`` and the
weight gradient at the kept blocks only (SDDMM).

``w`` is a :class:`moecore.sparse.BsrMatrix` (its validated pattern, ``data`` the values);
``x`` and ``dy`` are ``[..., features]``; ``out``, when given, has already been checked by the
caller (:mod:`moecore.sparse` validates every argument). Three implementations
(:mod:`moecore.kernels.registry` chooses): :class:`RustBsr` (float32 numpy, the kernels of
``moecore._core``), :class:`CudaBsr` (float32 CuPy, ``cuda/bsr.cu``) and :class:`DenseBsr`
(a dense product in array-module operations, any float dtype).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore import _core
from moecore.backend import xp_of


def kernel_isa() -> str:
    """The instruction set the CPU block micro-kernels use (``"avx512"``, ``"avx2"`` or
    ``"scalar"``)."""
    return _core.bsr_kernel_isa()


def cpu_pattern(shape: tuple[int, int], block: int, indptr: Any, indices: Any) -> Any:
    """The pattern the CPU kernels take, validated in Rust (``ValueError`` naming the rule)."""
    return _core.BsrPattern(shape, block, indptr, indices)


def _matrix(a: Any) -> Any:
    """``a [..., n]`` viewed as ``[rows, n]``."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


class RustBsr:
    """The BSR kernels of ``moecore._core`` (float32 numpy, AVX-512/AVX2 micro-kernels)."""

    @staticmethod
    def linear(x: Any, w: Any, bias: Any = None, out: Any = None) -> Any:
        """``x @ w.T (+ bias)``, into ``out`` when given."""
        x2 = _matrix(x)
        if out is not None:
            _core.bsr_linear(x2, w._pattern, w.data, bias, out.reshape(x2.shape[0], w.shape[0]))
            return out
        return _core.bsr_linear(x2, w._pattern, w.data, bias).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def linear_dx(dy: Any, w: Any, out: Any = None) -> Any:
        """``dy @ w``, into ``out`` when given."""
        dy2 = _matrix(dy)
        if out is not None:
            _core.bsr_linear_dx(dy2, w._pattern, w.data, out.reshape(dy2.shape[0], w.shape[1]))
            return out
        return _core.bsr_linear_dx(dy2, w._pattern, w.data).reshape(*dy.shape[:-1], w.shape[1])

    @staticmethod
    def linear_dw(dy: Any, x: Any, w: Any, out: Any = None) -> Any:
        """``dw`` at ``w``'s kept blocks ``[nnzb, B, B]``, into ``out`` when given."""
        if out is not None:
            _core.bsr_linear_dw(_matrix(dy), _matrix(x), w._pattern, out)
            return out
        return _core.bsr_linear_dw(_matrix(dy), _matrix(x), w._pattern)


def _on_device(w: Any) -> tuple[Any, Any]:
    """``w``'s pattern on the GPU (cached) and its values uploaded (``data`` stays the
    numpy truth an optimizer updates in place, so it is copied at each call)."""
    from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

    if w._device is None:
        w._device = cuda.BsrDevice(w.shape, w.block, w.indptr, w.indices)
    return w._device, cuda.default_backend().xp.asarray(w.data)


def _filled(out: Any, result: Any) -> Any:
    """The GPU kernels return new arrays: ``result``, or ``out`` filled from it."""
    if out is None:
        return result
    out[...] = result
    return out


class CudaBsr:
    """The BSR kernels of ``cuda/bsr.cu`` (float32 CuPy), on arrays flattened to 2-D."""

    @staticmethod
    def linear(x: Any, w: Any, bias: Any = None, out: Any = None) -> Any:
        """As :meth:`RustBsr.linear`."""
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        pattern, data = _on_device(w)
        y = cuda.bsr_linear(_matrix(x), pattern, data, bias)
        return _filled(out, y.reshape(*x.shape[:-1], w.shape[0]))

    @staticmethod
    def linear_dx(dy: Any, w: Any, out: Any = None) -> Any:
        """As :meth:`RustBsr.linear_dx`."""
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        pattern, data = _on_device(w)
        dx = cuda.bsr_linear_dx(_matrix(dy), pattern, data)
        return _filled(out, dx.reshape(*dy.shape[:-1], w.shape[1]))

    @staticmethod
    def linear_dw(dy: Any, x: Any, w: Any, out: Any = None) -> Any:
        """As :meth:`RustBsr.linear_dw`."""
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        return _filled(out, cuda.bsr_linear_dw(_matrix(dy), _matrix(x), _on_device(w)[0]))


def _block_coords(w: Any) -> tuple[Any, Any]:
    rows = np.repeat(np.arange(len(w.indptr) - 1), np.diff(w.indptr))
    return rows, np.asarray(w.indices)


def dense(data: Any, w: Any) -> Any:
    """The dense ``[out, in]`` matrix with ``w``'s pattern and the blocks ``data``."""
    xp = xp_of(data)
    b = w.block
    rows, cols = _block_coords(w)
    full = xp.zeros((w.shape[0] // b, b, w.shape[1] // b, b), dtype=data.dtype)
    full[rows, :, cols, :] = data
    return full.reshape(w.shape)


def _blocks_of(full: Any, w: Any) -> Any:
    b = w.block
    rows, cols = _block_coords(w)
    tiles = full.reshape(w.shape[0] // b, b, w.shape[1] // b, b)
    return tiles[rows, :, cols, :]


class DenseBsr:
    """The BSR products through the dense matrix, in array-module operations (numpy or
    CuPy, any float dtype): a reference, not a fast path."""

    @staticmethod
    def linear(x: Any, w: Any, bias: Any = None, out: Any = None) -> Any:
        """As :meth:`RustBsr.linear`."""
        y = x @ dense(w.data, w).T
        return _filled(out, y + bias if bias is not None else y)

    @staticmethod
    def linear_dx(dy: Any, w: Any, out: Any = None) -> Any:
        """As :meth:`RustBsr.linear_dx`."""
        return _filled(out, dy @ dense(w.data, w))

    @staticmethod
    def linear_dw(dy: Any, x: Any, w: Any, out: Any = None) -> Any:
        """As :meth:`RustBsr.linear_dw`."""
        g2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        return _filled(out, _blocks_of(g2.T @ x2, w))
