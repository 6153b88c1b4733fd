"""Top-k gradient compression kernels (and the payload codec they share), on arrays.

Payloads are host bytes whatever the gradient's device, so the codec — :func:`header`,
:func:`decode`, :func:`decompress`, :func:`decompress_into`, :func:`decompress_sum`,
:func:`encode`, :func:`int8` — is always the Rust one of ``moecore._core``
(``rust/compress/``). The selection has one implementation per device
(:mod:`moecore.kernels.registry` chooses): :class:`RustTopK` (float32 numpy: selection, error
feedback, momentum and encoding in one Rust call) and :class:`CudaTopK` (float32 CuPy: the
selection and error feedback of ``cuda/topk.cu``, the decompression scatter of
``cuda/codec.cu``; the host encodes). There is no array-module implementation.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from moecore import _core

#: The payload header as a mapping (version, encodings, n, k, section sizes), checked.
header = _core.compress_header
#: ``(idx, values, n)`` of a payload, validated (CRC and contents).
decode = _core.compress_decode
#: A new float32 array of n elements from a payload.
decompress = _core.compress_decompress
#: A payload written (or added, scaled) into a flat float32 array.
decompress_into = _core.compress_decompress_into
#: Several payloads summed (scaled) into a flat float32 array, in parallel.
decompress_sum = _core.compress_decompress_sum
#: A payload of given indices and values.
encode = _core.compress_encode
#: The int8 quantizer's payload of a flat float32 array.
int8 = _core.compress_int8


class RustTopK:
    """Top-k selection and encoding of float32 numpy gradients in one Rust call."""

    #: ``compress(flat, k, *, method, seed, exact_k, index, values, chunk, residual,
    #: velocity, accumulator, momentum)`` → payload.
    compress = staticmethod(_core.compress_topk)
    #: ``compress_pieces(flats, k, residual, **options)`` → the payload of the concatenation.
    compress_pieces = staticmethod(_core.compress_topk_pieces)


class CudaTopK:
    """Top-k selection, error feedback and decompression scatter on float32 CuPy arrays."""

    @staticmethod
    def xp() -> ModuleType:
        """The array module of the GPU backend (CuPy, or the test suite's emulation)."""
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        return cuda.default_backend().xp

    @staticmethod
    def select(grad: Any, k: int, method: str) -> tuple[Any, Any]:
        """``(idx, values)`` of the ``k`` largest-magnitude entries of ``grad``."""
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        return cuda.topk_select(grad, k, method=method)

    @staticmethod
    def error_feedback(residual: Any, grad: Any, k: int, method: str) -> tuple[Any, Any]:
        """``residual += grad``, then the top ``k`` of it, cleared from it."""
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        return cuda.topk_error_feedback(residual, grad, k, method=method)

    @staticmethod
    def scatter(decoded: list[tuple[Any, Any]], out: Any, *, add: bool, scale: float) -> Any:
        """Scatters decoded ``(idx, values)`` pairs in order into ``out`` (zeroed first
        unless ``add``)."""
        from moecore.kernels import cuda  # lazy: the GPU path imports CuPy

        be = cuda.default_backend()
        if not add:
            cuda.scatter(out, be.xp.zeros(0, np.int32), be.xp.zeros(0, np.float32), backend=be)
        for idx, vals in decoded:
            cuda.scatter(
                out, be.xp.asarray(idx), be.xp.asarray(vals), scale=scale, add=True, backend=be
            )
        return out
