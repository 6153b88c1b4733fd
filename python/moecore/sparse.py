"""Block-sparse (BSR) weights and their matmuls, on plain numpy arrays.

A :class:`BsrMatrix` stores the kept ``B x B`` blocks of an ``[out_features, in_features]``
weight (``B`` ∈ {8, 16, 32, 64}) in the BSR layout scipy uses: block-row ``i`` holds the blocks
``indptr[i]:indptr[i + 1]``, block ``b`` sits at block-column ``indices[b]`` and its values are
``data[b]`` (``[nnzb, B, B]``, float32). Three products work on the kept blocks only, so pruned
blocks cost nothing in the forward pass or either gradient:

- :func:`bsr_linear` — ``y = x @ w.T (+ bias)`` (the forward pass of a linear layer),
- :func:`bsr_linear_dx` — ``dx = dy @ w`` (gradient with respect to the input),
- :func:`bsr_linear_dw` — ``dw`` at the kept blocks of a pattern only (SDDMM), ``[nnzb, B, B]``.

They run in Rust on every core (rayon) with the GIL released, with block micro-kernels for
AVX-512 or AVX2 picked at run time (:func:`kernel_isa`), read their inputs in place and return
new float32 arrays without copying. Inputs are numpy arrays or any DLPack exporter (a PyTorch
CPU tensor is viewed in place; a CUDA one takes the GPU path, as a CuPy array does) and must be
float32 and C-contiguous: anything else is a ``ValueError`` naming the argument, not a silent
conversion. Leading batch dimensions of ``x``
and ``dy`` are allowed (``[..., features]``) and kept in the result.

Example::

    >>> import numpy as np
    >>> from moecore.sparse import BsrMatrix, bsr_linear
    >>> w = BsrMatrix.random((256, 512), block=32, density=0.25, seed=0)
    >>> x = np.ones((4, 512), dtype=np.float32)
    >>> y = bsr_linear(x, w)
    >>> bool(np.allclose(y, x @ w.to_dense().T, atol=1e-4))
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moecore.backend import as_array, device_of, is_cupy_array
from moecore.kernels import bsr as bsr_kernels
from moecore.kernels.registry import select

__all__ = [
    "SUPPORTED_BLOCKS",
    "BsrMatrix",
    "bsr_linear",
    "bsr_linear_dw",
    "bsr_linear_dx",
    "kernel_isa",
]

#: Block edges the kernels are built for.
SUPPORTED_BLOCKS: tuple[int, ...] = (8, 16, 32, 64)


def kernel_isa() -> str:
    """The instruction set the block micro-kernels use on this CPU (``"avx512"``, ``"avx2"``
    or ``"scalar"``)."""
    return bsr_kernels.kernel_isa()


def _check_block(block: object) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise ValueError(f"block: expected an int in {SUPPORTED_BLOCKS}, got {block!r}")
    if int(block) not in SUPPORTED_BLOCKS:
        raise ValueError(f"block: expected one of {SUPPORTED_BLOCKS}, got {block}")
    return int(block)


def _check_shape(shape: object, block: int) -> tuple[int, int]:
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape)
    ):
        raise ValueError(f"shape: expected (out_features, in_features) as two ints, got {shape!r}")
    rows, cols = int(shape[0]), int(shape[1])
    for name, size in (("out_features", rows), ("in_features", cols)):
        if size < 0:
            raise ValueError(f"shape: {name} must be >= 0, got {size}")
        if size % block:
            raise ValueError(
                f"shape: {name} = {size} is not a multiple of block = {block} "
                f"(expected a multiple of {block})"
            )
    return rows, cols


def _index_array(a: object, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {arr.dtype}")
    out = np.array(arr, dtype=np.int64, copy=True)
    out.flags.writeable = False
    return out


def _float32_array(a: object, name: str, ndim: int | None = None) -> np.ndarray:
    """``a`` itself when it is a C-contiguous float32 ndarray (of ``ndim`` dimensions), else a
    ValueError naming what is wrong (a CPU DLPack exporter is viewed in place first)."""
    a = as_array(a, name)
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != np.float32:
        raise ValueError(f"{name}: expected dtype float32, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got {a.ndim}-D with shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name}: expected a C-contiguous array, got strides {a.strides} "
            "(use numpy.ascontiguousarray)"
        )
    return a


class BsrMatrix:
    """A block-sparse ``[out_features, in_features]`` float32 matrix of ``block x block`` blocks.

    Args:
        shape: ``(out_features, in_features)``, both multiples of ``block``.
        block: block edge ``B``, one of 8, 16, 32, 64.
        indptr: ``[out_features / B + 1]`` integers: block-row ``i`` stores blocks
            ``indptr[i]:indptr[i + 1]``; starts at 0, never decreases, ends at ``nnzb``.
        indices: ``[nnzb]`` block-column of each stored block, in ``[0, in_features / B)``,
            strictly increasing within a block-row (sorted, no duplicate blocks).
        data: ``[nnzb, B, B]`` float32, C-contiguous: the values of each stored block. Kept by
            reference (no copy), so in-place updates (an optimizer step) are seen by the kernels.

    Every rule is checked at construction; a violation raises ``ValueError`` naming the rule.
    ``indptr`` and ``indices`` are stored as read-only int64 copies, since the validated pattern
    (and the transposed index built from it) must not change under the matrix.

    Shape:
        ``data``: ``[nnzb, B, B]``; dense equivalent ``[out_features, in_features]``.

    Examples::

        >>> w = BsrMatrix.from_dense(np.eye(16, dtype=np.float32), block=8)
        >>> w.nnzb, w.shape
        (2, (16, 16))
    """

    __slots__ = ("_device", "_pattern", "block", "data", "indices", "indptr", "shape")

    def __init__(
        self,
        shape: tuple[int, int],
        block: int,
        indptr: Any,
        indices: Any,
        data: np.ndarray,
    ) -> None:
        self.block: int = _check_block(block)
        self.shape: tuple[int, int] = _check_shape(shape, self.block)
        self.indptr: np.ndarray = _index_array(indptr, "indptr")
        self.indices: np.ndarray = _index_array(indices, "indices")
        data = _float32_array(data, "data", ndim=3)
        expected = (len(self.indices), self.block, self.block)
        if data.shape != expected:
            raise ValueError(
                f"data: expected shape (nnzb, block, block) = {expected}, got {data.shape}"
            )
        self.data: np.ndarray = data
        # Structural rules (indptr consistency, sorted, in range, no duplicates) in Rust.
        self._pattern = bsr_kernels.cpu_pattern(self.shape, self.block, self.indptr, self.indices)
        self._device: Any = None  # the pattern on the GPU, built on first CuPy use

    @property
    def nnzb(self) -> int:
        """Number of stored blocks."""
        return len(self.indices)

    @property
    def density(self) -> float:
        """Fraction of the blocks that are stored (0 for an empty shape)."""
        total = (self.shape[0] // self.block) * (self.shape[1] // self.block)
        return self.nnzb / total if total else 0.0

    def __repr__(self) -> str:
        return (
            f"BsrMatrix(shape={self.shape}, block={self.block}, nnzb={self.nnzb}, "
            f"density={self.density:.4g})"
        )

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def from_dense(cls, w: Any, block: int, mask: Any = None) -> BsrMatrix:
        """The BSR form of the dense ``w`` (any real dtype, converted to float32).

        Args:
            w: ``[out_features, in_features]``.
            block: block edge.
            mask: optional boolean ``[out_features / B, in_features / B]``: exactly these blocks
                are kept (even where ``w`` is zero; elsewhere ``w`` is dropped). Without it,
                the blocks with any nonzero value are kept.
        """
        block = _check_block(block)
        arr = np.asarray(w)
        if arr.ndim != 2:
            raise ValueError(f"w: expected a 2-D array, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"w: expected a real numeric dtype, got {arr.dtype}")
        rows, cols = _check_shape(arr.shape, block)
        nbr, nbc = rows // block, cols // block
        blocks = (
            np.asarray(arr, dtype=np.float32).reshape(nbr, block, nbc, block).transpose(0, 2, 1, 3)
        )
        if mask is None:
            keep = blocks.any(axis=(2, 3))
        else:
            keep = np.asarray(mask)
            if keep.dtype != np.bool_:
                raise ValueError(f"mask: expected dtype bool, got {keep.dtype}")
            if keep.shape != (nbr, nbc):
                raise ValueError(
                    f"mask: expected shape (out_features/B, in_features/B) = {(nbr, nbc)}, "
                    f"got {keep.shape}"
                )
        rows_i, cols_j = np.nonzero(keep)  # row-major order: sorted within each block-row
        indptr = np.zeros(nbr + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows_i, minlength=nbr), out=indptr[1:])
        data = np.ascontiguousarray(blocks[rows_i, cols_j], dtype=np.float32)
        return cls((rows, cols), block, indptr, cols_j, data)

    @classmethod
    def random(
        cls, shape: tuple[int, int], block: int, density: float, seed: int | None = None
    ) -> BsrMatrix:
        """A matrix keeping ``round(density · blocks)`` blocks chosen uniformly at random.

        Values are normal with standard deviation ``1 / sqrt(kept inputs per output)``
        (``density · in_features``), the usual fan-in scaling for the inputs a row really sees.
        ``seed`` makes the pattern and the values reproducible.
        """
        block = _check_block(block)
        rows, cols = _check_shape(shape, block)
        if not isinstance(density, (int, float, np.floating)) or not 0.0 <= density <= 1.0:
            raise ValueError(f"density: expected a number in [0, 1], got {density!r}")
        nbr, nbc = rows // block, cols // block
        total = nbr * nbc
        nnzb = round(float(density) * total)
        rng = np.random.default_rng(seed)
        flat = np.sort(rng.choice(total, size=nnzb, replace=False)) if nnzb else np.zeros(0, int)
        rows_i, cols_j = np.divmod(flat, nbc) if nbc else (flat, flat)
        indptr = np.zeros(nbr + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows_i, minlength=nbr), out=indptr[1:])
        fan_in = max(1.0, float(density) * cols)
        data = rng.standard_normal((nnzb, block, block), dtype=np.float32)
        data *= np.float32(1.0 / math.sqrt(fan_in))
        return cls((rows, cols), block, indptr, cols_j, data)

    @classmethod
    def from_scipy(cls, bsr: Any) -> BsrMatrix:
        """From a ``scipy.sparse`` BSR matrix or array with square blocks of a supported size.

        Duplicate blocks are summed and indices sorted (on a copy; ``bsr`` is not changed), as
        scipy's canonical form has them. Values are converted to float32.
        """
        import scipy.sparse as sp

        if not sp.issparse(bsr) or bsr.format != "bsr":
            got = getattr(bsr, "format", type(bsr).__name__)
            raise ValueError(
                f"bsr: expected a scipy.sparse BSR matrix or array, got {got} "
                "(convert with .tobsr(blocksize=(B, B)))"
            )
        r, c = bsr.blocksize
        if r != c:
            raise ValueError(f"bsr: expected square blocks, got blocksize {bsr.blocksize}")
        canonical = bsr.copy()
        canonical.sum_duplicates()  # also sorts the indices
        data = np.ascontiguousarray(canonical.data, dtype=np.float32)
        return cls(tuple(canonical.shape), r, canonical.indptr, canonical.indices, data)

    # ---- conversions ----------------------------------------------------------------------

    def to_dense(self) -> np.ndarray:
        """The dense ``[out_features, in_features]`` float32 matrix (zeros outside the blocks)."""
        rows, cols = self.shape
        b = self.block
        nbr, nbc = rows // b, cols // b
        blocks = np.zeros((nbr, nbc, b, b), dtype=np.float32)
        block_rows = np.repeat(np.arange(nbr), np.diff(self.indptr))
        blocks[block_rows, self.indices] = self.data
        return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3).reshape(rows, cols))

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.bsr_array`` with copies of this matrix's arrays."""
        import scipy.sparse as sp

        return sp.bsr_array(
            (self.data.copy(), self.indices.copy(), self.indptr.copy()),
            shape=self.shape,
            blocksize=(self.block, self.block),
        )


# ---- products --------------------------------------------------------------------------------


def _check_matrix_operand(a: np.ndarray, name: str, width: int, what: str) -> None:
    """Raises ``ValueError`` unless ``a`` is ``[..., width]``, float32, C-contiguous."""
    a = _float32_array(a, name)
    if a.ndim < 1 or a.shape[-1] != width:
        raise ValueError(f"{name}: expected shape (..., {width}) ({what} = {width}), got {a.shape}")


def _out_array(out: Any, shape: tuple[int, ...]) -> Any:
    """``out`` checked to be exactly ``shape`` (the result's shape), so a wrongly shaped
    ``out`` of the right size is refused rather than filled in the wrong layout."""
    out = as_array(out, "out", gpu=True)
    if is_cupy_array(out):
        if out.dtype != np.float32 or tuple(out.shape) != shape:
            raise ValueError(f"out: expected float32 of shape {shape}, got {out.dtype} {out.shape}")
        return out
    out = _float32_array(out, "out")
    if out.shape != shape:
        raise ValueError(f"out: expected shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out: the array is read-only")
    return out


def _check_matrix(w: object, name: str) -> BsrMatrix:
    if not isinstance(w, BsrMatrix):
        raise ValueError(f"{name}: expected a moecore.sparse.BsrMatrix, got {type(w).__name__}")
    return w


def bsr_linear(
    x: np.ndarray, w: BsrMatrix, bias: np.ndarray | None = None, *, out: np.ndarray | None = None
) -> np.ndarray:
    """``y = x @ w.T (+ bias)`` over the kept blocks of ``w`` only.

    Args:
        x: ``[..., in_features]`` float32, C-contiguous.
        w: the ``[out_features, in_features]`` weight.
        bias: optional ``[out_features]`` float32.
        out: optional ``[..., out_features]`` float32 C-contiguous array to write the result
            into (every element is overwritten; it must not share memory with ``x``), as
            ``numpy.matmul(..., out=)``: a caller reusing it saves the fresh allocation,
            whose page faults are a visible share of a large product.

    Returns:
        ``[..., out_features]`` float32: ``out`` when given, else a new array.
    """
    w = _check_matrix(w, "w")
    x = as_array(x, "x", gpu=True)
    bias = as_array(bias, "bias", gpu=True)
    shape = (*x.shape[:-1], w.shape[0])
    if not is_cupy_array(x):
        _check_matrix_operand(x, "x", w.shape[1], "in_features")
        if bias is not None:
            bias = _float32_array(bias, "bias", ndim=1)
            if bias.shape != (w.shape[0],):
                raise ValueError(
                    f"bias: expected shape ({w.shape[0]},) (out_features), got {bias.shape}"
                )
    dst = None if out is None else _out_array(out, shape)
    y = select("bsr", device_of(x), np.float32).linear(x, w, bias, dst)
    return y if out is None else out


def bsr_linear_dx(dy: np.ndarray, w: BsrMatrix, *, out: np.ndarray | None = None) -> np.ndarray:
    """``dx = dy @ w``: the gradient of :func:`bsr_linear` with respect to ``x``.

    Args:
        dy: ``[..., out_features]`` float32, C-contiguous.
        w: the ``[out_features, in_features]`` weight.
        out: optional ``[..., in_features]`` float32 C-contiguous array to write into (as in
            :func:`bsr_linear`).

    Returns:
        ``[..., in_features]`` float32: ``out`` when given, else a new array.
    """
    w = _check_matrix(w, "w")
    dy = as_array(dy, "dy", gpu=True)
    shape = (*dy.shape[:-1], w.shape[1])
    if not is_cupy_array(dy):
        _check_matrix_operand(dy, "dy", w.shape[0], "out_features")
    dst = None if out is None else _out_array(out, shape)
    dx = select("bsr", device_of(dy), np.float32).linear_dx(dy, w, dst)
    return dx if out is None else out


def bsr_linear_dw(
    dy: np.ndarray, x: np.ndarray, pattern: BsrMatrix, *, out: np.ndarray | None = None
) -> np.ndarray:
    """The gradient of :func:`bsr_linear` with respect to the kept blocks of the weight only
    (an SDDMM): block ``b`` at ``(i, j)`` is ``dy[:, i-block].T @ x[:, j-block]``, summed over
    all rows (leading dimensions included). Pruned blocks are never computed.

    Args:
        dy: ``[..., out_features]`` float32, C-contiguous.
        x: ``[..., in_features]`` float32, C-contiguous, the same leading shape as ``dy``.
        pattern: the weight whose kept blocks to differentiate (its ``data`` is not read).
        out: optional ``[nnzb, B, B]`` float32 C-contiguous array to write into (overwritten,
            not accumulated into).

    Returns:
        ``[nnzb, B, B]`` float32, laid out like ``pattern.data``: ``out`` when given.
    """
    pattern = _check_matrix(pattern, "pattern")
    dy, x = as_array(dy, "dy", gpu=True), as_array(x, "x", gpu=True)
    on_device = is_cupy_array(dy) or is_cupy_array(x)
    if not on_device:
        _check_matrix_operand(dy, "dy", pattern.shape[0], "out_features")
        _check_matrix_operand(x, "x", pattern.shape[1], "in_features")
    if dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"x: expected the leading shape of dy {dy.shape[:-1]}, got {x.shape[:-1]}")
    dst = None if out is None else _out_array(out, pattern.data.shape)
    dw = select("bsr", "cuda" if on_device else "cpu", np.float32).linear_dw(dy, x, pattern, dst)
    return dw if out is None else out
