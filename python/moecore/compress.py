"""Gradient compression: top-k sparsification with error feedback, and 8-bit quantization.

The work happens in moecore's Rust core (multithreaded, GIL released, no copy of the
gradient); this module holds the per-tensor state and checks arguments. In the habit of
Horovod and GRACE::

    from moecore.compress import TopK
    c = TopK(ratio=0.01, method="sampled", error_feedback=True, values="f16")
    payload, ctx = c.compress(grad, name="layer3.w")  # payload: a numpy uint8 array
    dense = c.decompress(payload, ctx)                 # ctx never has to leave the rank
    c.decompress_sum([p0, p1, p2], out=buf, scale=1 / 3)

**Inputs.** Gradients are numpy ``float32`` C-contiguous arrays of any shape, or any CPU
object exporting DLPack (e.g. a PyTorch CPU tensor), used in place through
``numpy.from_dlpack`` (:func:`moecore.backend.as_array`, the doorway every runtime face
shares; a CUDA exporter such as a torch CUDA tensor is taken as a CuPy array, below). Payloads
may be DLPack uint8 tensors too (an all-gather's). A wrong dtype raises ``TypeError``; a non-contiguous array, NaN or
±inf in the gradient, or a bad argument raises ``ValueError``. After a NaN/inf gradient the
state is as it was: momentum state exactly (checked before the update), an error-feedback
residual up to float32 rounding (the single fused pass checks each block before adding it
and subtracts what it had added).

**CuPy arrays.** ``TopK.compress`` of a float32 CuPy gradient selects on the GPU
(``cuda/topk.cu``: the same k entries as ``method="exact"``, also for ``"sampled"``, which
only narrows the work; ``exact_k=False`` does not apply) and
keeps its residual on the device; only the k indices and values are copied to the host, where
the payload is encoded. ``decompress*`` into a CuPy ``out`` decodes and validates on the host
and scatters on the GPU. Momentum correction and value encodings other than ``"f32"`` have
no GPU path yet and raise ``NotImplementedError``.

**Selection.** ``method="exact"`` sends the k largest magnitudes (ties to the lower index);
``"sampled"`` (default) estimates the threshold from a strided sample as in Deep Gradient
Compression, corrects it, and then takes the exact top-k among the candidates, so it returns
the same k entries as ``"exact"`` whenever the correction succeeds (it always returns exactly
k unless ``exact_k=False``). ``k = max(1, floor(ratio * n + 1/2))``.

**Error feedback.** With ``error_feedback=True`` each ``name`` keeps a residual ``r``:
``r <- r + grad``, selection on ``r``, and the sent entries keep only what the value encoding
lost. With ``momentum=m`` (DGC momentum correction) it keeps ``u <- m*u + grad``,
``v <- v + u``, selects on ``v`` and clears both where sent. ``state_dict()`` /
``load_state_dict()`` carry this state through checkpoints.

**Wire format.** A 40-byte header (magic ``b"MoEC"``, version, index and value encodings, n,
k, index-section length, int8 chunk), the index section, the values, and a CRC32C of
everything before it. Its size in bytes is ``44 + I + V`` with ``I`` = the sum over sent
indices of the LEB128 length of each gap minus one (``"varint"``), ``ceil(n/8)``
(``"bitmap"``), ``4k`` (``"raw"``) or ``0`` (``"dense"``, k = n), and ``V`` = ``4k`` (f32),
``2k`` (f16, bf16) or ``k + 4*ceil(k/chunk)`` (int8). ``index="auto"`` picks the smallest.
f16 and bf16 saturate at their largest finite value instead of overflowing. Decoding checks
everything and raises :class:`moecore.errors.CorruptPayload` (a ``ValueError``) naming what
is wrong; it never allocates more than the payload length or the caller's output implies.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moecore.backend import as_array, is_cupy_array
from moecore.errors import CorruptPayload
from moecore.kernels import topk
from moecore.kernels.registry import select

__all__ = [
    "Context",
    "Int8",
    "TopK",
    "decompress",
    "decompress_add",
    "decompress_sum",
    "payload_info",
    "warmup_ratios",
]

METHODS = ("sampled", "exact")
INDEX_ENCODINGS = ("auto", "varint", "bitmap", "raw", "dense")
VALUE_ENCODINGS = ("f32", "f16", "bf16", "int8")
MAX_CHUNK = 1 << 24
#: Largest output ``decompress`` allocates from a payload's header alone (no ctx, no out).
DEFAULT_MAX_ELEMENTS = 1 << 28
_STATE_VERSION = 1


@dataclass(frozen=True)
class Context:
    """What decompression needs besides the payload: the gradient's shape (and, for
    diagnostics, the tensor's name and how many entries were sent). It never has to leave
    the rank."""

    shape: tuple[int, ...]
    name: str | None
    k: int

    @property
    def size(self) -> int:
        """Number of elements of the dense gradient."""
        return math.prod(self.shape)


# --- argument conversion --------------------------------------------------------------------


def _as_array(obj: Any, what: str) -> np.ndarray:
    """A numpy view of ``obj`` (numpy array or CPU DLPack exporter), never a copy."""
    arr = as_array(obj, what)
    if not isinstance(arr, np.ndarray):
        raise TypeError(
            f"{what} must be a numpy float32 array or a CPU object exporting DLPack, "
            f"got {type(obj).__name__}"
        )
    return arr


def _as_float32(obj: Any, what: str, *, writable: bool = False) -> np.ndarray:
    arr = _as_array(obj, what)
    if arr.dtype != np.float32:
        raise TypeError(f"{what} must have dtype float32, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(
            f"{what} must be C-contiguous (shape {arr.shape}, strides {arr.strides}); "
            f"pass numpy.ascontiguousarray({what})"
        )
    if writable and not arr.flags.writeable:
        raise ValueError(f"{what} is read-only")
    return arr


def _as_payload(obj: Any, what: str = "payload") -> np.ndarray:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return np.frombuffer(obj, dtype=np.uint8)
    obj = as_array(obj, what)  # e.g. a torch uint8 tensor from an all-gather
    if not isinstance(obj, np.ndarray):
        raise TypeError(f"{what} must be a numpy uint8 array or bytes, got {type(obj).__name__}")
    if obj.dtype != np.uint8 or obj.ndim != 1:
        raise TypeError(
            f"{what} must be a 1-D uint8 array, got dtype {obj.dtype} with shape {obj.shape}"
        )
    return np.ascontiguousarray(obj)


def _check_choice(what: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_fraction(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float in (0, 1], got {type(value).__name__}")
    if not 0.0 < float(value) <= 1.0:  # also rejects NaN
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")
    return float(value)


def _check_int(what: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {value}")
    return int(value)


def _stream_seed(seed: int, name: str | None, step: int) -> int:
    """A per-(name, step) seed that is the same in every process (unlike ``hash``)."""
    tag = zlib.crc32(b"\x00" if name is None else name.encode("utf-8"))
    return (seed * 0x9E3779B97F4A7C15 + tag * 0x100000001B3 + step) % (1 << 64)


# --- decoding (shared by every compressor: payloads describe themselves) ---------------------


def _scatter_on_device(payloads: list[np.ndarray], out: Any, *, add: bool, scale: float) -> Any:
    """Decodes and validates every payload on the host, then scatters them in order into the
    CuPy array ``out`` (zeroed first unless ``add``)."""
    decoded = []
    for i, p in enumerate(payloads):
        idx, vals, n = topk.decode(p)
        if int(n) != out.size:
            raise CorruptPayload(f"payloads[{i}] describes n = {n} elements, out has {out.size}")
        decoded.append((idx.astype(np.int32), vals))
    return select("topk", "cuda", np.float32).scatter(decoded, out, add=add, scale=scale)


def payload_info(payload: Any) -> dict[str, Any]:
    """The header of ``payload`` (version, index and value encodings, n, k, section sizes),
    after checking the header and total length; :func:`decompress` also checks the CRC and
    the contents."""
    return dict(topk.header(_as_payload(payload)))


def decompress(
    payload: Any,
    ctx: Context | None = None,
    out: Any = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> np.ndarray:
    """The dense gradient a payload carries (zeros where nothing was sent).

    Args:
        payload: a payload from ``compress`` (numpy uint8 array or bytes).
        ctx: the context ``compress`` returned; gives the shape (and must match the payload).
        out: a float32 array (or CPU DLPack object) to overwrite instead of allocating.
        max_elements: without ``ctx`` or ``out``, the largest n a header may ask to allocate.

    Returns:
        ``out`` if given, else a new float32 array of ``ctx.shape`` (flat without ``ctx``).

    Raises:
        CorruptPayload: the payload is damaged, foreign, or does not match ``ctx``/``out``.
    """
    p = _as_payload(payload)
    dev = None if out is None else as_array(out, "out", gpu=True)
    if dev is not None and is_cupy_array(dev):
        if ctx is not None and ctx.size != dev.size:
            raise ValueError(f"out has {dev.size} elements, ctx describes {ctx.size}")
        _scatter_on_device([p], dev, add=False, scale=1.0)
        return out
    if dev is not None:
        dst = _as_float32(dev, "out", writable=True)
        if ctx is not None and ctx.size != dst.size:
            raise ValueError(f"out has {dst.size} elements, ctx describes {ctx.size}")
        topk.decompress_into(p, dst.reshape(-1), add=False)
        return out
    if ctx is not None:
        return topk.decompress(p, ctx.size).reshape(ctx.shape)
    n = int(topk.header(p)["n"])
    if n > max_elements:
        raise CorruptPayload(
            f"header claims n = {n} elements, more than max_elements = {max_elements}; "
            "pass ctx or out (or a larger max_elements) if the payload is trusted"
        )
    return topk.decompress(p, n)


def decompress_add(payload: Any, out: Any, scale: float = 1.0) -> Any:
    """``out += scale * dense(payload)`` in place (``out`` float32 of the payload's size);
    returns ``out``. Nothing is written unless the payload is valid."""
    dev = as_array(out, "out", gpu=True)
    if is_cupy_array(dev):
        _scatter_on_device([_as_payload(payload)], dev, add=True, scale=scale)
        return out
    dst = _as_float32(dev, "out", writable=True)
    topk.decompress_into(_as_payload(payload), dst.reshape(-1), add=True, scale=scale)
    return out


def decompress_sum(
    payloads: Iterable[Any], out: Any, scale: float = 1.0, *, overwrite: bool = False
) -> Any:
    """``out += scale * sum(dense(p) for p in payloads)`` in place, in parallel over ``out``:
    the all-gather path of data parallelism. With ``overwrite=True``, ``out = scale * sum``
    instead (its old contents are ignored; cheaper than zeroing ``out`` first, as the zeroing
    is done piecewise in cache). Every payload is validated before ``out`` is touched; the
    result does not depend on the number of threads. Returns ``out``."""
    ps = [_as_payload(p, f"payloads[{i}]") for i, p in enumerate(payloads)]
    dev = as_array(out, "out", gpu=True)
    if is_cupy_array(dev):
        _scatter_on_device(ps, dev, add=not overwrite, scale=scale)
        return out
    dst = _as_float32(dev, "out", writable=True)
    topk.decompress_sum(ps, dst.reshape(-1), scale=scale, overwrite=overwrite)
    return out


class _Decoding:
    """The decoding methods every compressor offers (payloads describe themselves)."""

    max_elements: int = DEFAULT_MAX_ELEMENTS

    def decompress(self, payload: Any, ctx: Context | None = None, out: Any = None) -> np.ndarray:
        """The dense gradient of ``payload``; see :func:`moecore.compress.decompress`."""
        return decompress(payload, ctx, out, max_elements=self.max_elements)

    def decompress_add(
        self, payload: Any, out: Any, scale: float = 1.0, ctx: Context | None = None
    ) -> Any:
        """``out += scale * dense(payload)``; see :func:`moecore.compress.decompress_add`."""
        dev = as_array(out, "out", gpu=True)
        size = dev.size if is_cupy_array(dev) else _as_float32(dev, "out").size
        if ctx is not None and ctx.size != size:
            raise ValueError(f"out has {size} elements, ctx describes {ctx.size}")
        return decompress_add(payload, out, scale)

    def decompress_sum(
        self, payloads: Iterable[Any], out: Any, scale: float = 1.0, *, overwrite: bool = False
    ) -> Any:
        """``out += scale * sum of payloads`` (``=`` with ``overwrite``); see
        :func:`moecore.compress.decompress_sum`."""
        return decompress_sum(payloads, out, scale, overwrite=overwrite)


# --- top-k -----------------------------------------------------------------------------------


def warmup_ratios(ratio: float, start: float = 0.25, factor: float = 4.0) -> list[float]:
    """DGC's exponential sparsity warm-up: densities ``start, start/factor, ...`` while above
    ``ratio``, then ``ratio``. ``warmup_ratios(0.001)`` is ``[0.25, 0.0625, 0.015625,
    0.00390625, 0.001]``, i.e. 75% -> 93.75% -> 98.4% -> 99.6% -> 99.9% sparsity."""
    ratio = _check_fraction("ratio", ratio)
    start = _check_fraction("start", start)
    if not factor > 1.0:
        raise ValueError(f"factor must be > 1, got {factor}")
    out = []
    d = start
    while d > ratio:
        out.append(d)
        d /= factor
    out.append(ratio)
    return out


@dataclass
class _Slot:
    shape: tuple[int, ...]
    calls: int = 0
    residual: np.ndarray | None = None
    velocity: np.ndarray | None = None
    accumulator: np.ndarray | None = None

    def buffers(self) -> dict[str, np.ndarray]:
        named = {
            "residual": self.residual,
            "velocity": self.velocity,
            "accumulator": self.accumulator,
        }
        return {k: v for k, v in named.items() if v is not None}


class TopK(_Decoding):
    """Top-k sparsification with error feedback (Deep Gradient Compression style).

    Args:
        ratio: fraction of entries sent, in (0, 1]; ``k = max(1, floor(ratio*n + 1/2))``.
        method: ``"sampled"`` (DGC threshold estimate, default) or ``"exact"``.
        error_feedback: keep a residual per ``name`` and add it to the next gradient.
        momentum: DGC momentum correction factor in [0, 1) (needs ``error_feedback``), or None.
        values: value encoding: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"int8"``.
        index: index encoding: ``"auto"`` (smallest), ``"varint"``, ``"bitmap"``, ``"raw"``,
            ``"dense"`` (only when every element is sent).
        chunk: values per int8 scale.
        exact_k: with ``"sampled"``, send exactly k entries (else between k and 1.3k).
        seed: seeds the sample positions; equal seeds give equal payloads.
        warmup_steps: calls per warm-up stage (0: no warm-up). Stage densities are
            :func:`warmup_ratios` ``(ratio, warmup_start)``; each ``name`` counts its own calls.
        warmup_start: density of the first warm-up stage.
        max_elements: largest n ``decompress`` allocates from a header alone.

    Attributes:
        allreduce_compatible: False: sparse payloads cannot be summed by an all-reduce;
            all-gather them and use :meth:`decompress_sum`.

    Examples:
        >>> import numpy as np
        >>> c = TopK(ratio=0.25, error_feedback=False, method="exact")
        >>> p, ctx = c.compress(np.array([0.1, -3.0, 0.2, 2.0], dtype=np.float32))
        >>> c.decompress(p, ctx).tolist()
        [0.0, -3.0, 0.0, 0.0]
    """

    allreduce_compatible = False

    def __init__(
        self,
        ratio: float = 0.01,
        *,
        method: str = "sampled",
        error_feedback: bool = True,
        momentum: float | None = None,
        values: str = "f32",
        index: str = "auto",
        chunk: int = 256,
        exact_k: bool = True,
        seed: int = 0,
        warmup_steps: int = 0,
        warmup_start: float = 0.25,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        self.ratio = _check_fraction("ratio", ratio)
        self.method = _check_choice("method", method, METHODS)
        self.values = _check_choice("values", values, VALUE_ENCODINGS)
        self.index = _check_choice("index", index, INDEX_ENCODINGS)
        self.chunk = _check_int("chunk", chunk, 1, MAX_CHUNK)
        self.error_feedback = bool(error_feedback)
        if momentum is not None:
            if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
                raise ValueError(f"momentum must be a float in [0, 1) or None, got {momentum!r}")
            if not self.error_feedback:
                raise ValueError("momentum correction needs error_feedback=True")
            momentum = float(momentum)
        self.momentum = momentum
        self.exact_k = bool(exact_k)
        self.seed = _check_int("seed", seed, 0, (1 << 64) - 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0, 1 << 62)
        self.warmup_start = _check_fraction("warmup_start", warmup_start)
        self._stages = warmup_ratios(self.ratio, self.warmup_start) if self.warmup_steps else []
        self.max_elements = _check_int("max_elements", max_elements, 0, 1 << 62)
        self._slots: dict[str | None, _Slot] = {}

    def __repr__(self) -> str:
        return (
            f"TopK(ratio={self.ratio}, method={self.method!r}, "
            f"error_feedback={self.error_feedback}, momentum={self.momentum}, "
            f"values={self.values!r}, index={self.index!r})"
        )

    def ratio_at(self, step: int) -> float:
        """The density used at a name's ``step``-th call (0-based), warm-up included."""
        if self.warmup_steps and step // self.warmup_steps < len(self._stages):
            return self._stages[step // self.warmup_steps]
        return self.ratio

    @staticmethod
    def k_for(n: int, ratio: float) -> int:
        """Entries sent from n at ``ratio``: ``max(1, floor(ratio*n + 1/2))``, at most n."""
        return 0 if n == 0 else min(n, max(1, math.floor(ratio * n + 0.5)))

    def compress(self, grad: Any, name: str | None = None) -> tuple[np.ndarray, Context]:
        """Compresses ``grad`` (float32, any shape; numpy or CPU DLPack) without copying it.

        With error feedback, ``name`` identifies the tensor whose residual is used and
        updated in place; a name must keep its shape (``reset(name)`` forgets it).

        Returns:
            ``(payload, ctx)``: the payload (numpy uint8 array) and its :class:`Context`.

        Raises:
            TypeError: not float32 / not an array.
            ValueError: non-contiguous, NaN or inf in ``grad``, or ``name``'s shape changed.
            NotImplementedError: a CuPy gradient with momentum or non-f32 values.
        """
        grad = as_array(grad, "grad", gpu=True)
        if is_cupy_array(grad):
            return self._compress_on_device(grad, name)
        arr = _as_float32(grad, "grad")
        flat = arr.reshape(-1)
        shape = tuple(arr.shape)
        slot = self._host_slot(name, shape, flat.size)
        payload = select("topk", "cpu", np.float32).compress(
            flat,
            self.k_for(flat.size, self.ratio_at(slot.calls)),
            **self._options(name, slot.calls),
            residual=slot.residual,
            velocity=slot.velocity,
            accumulator=slot.accumulator,
            momentum=self.momentum or 0.0,
        )
        return self._stepped(slot, name, shape, payload)

    def compress_pieces(
        self, pieces: Sequence[Any], name: str | None = None
    ) -> tuple[np.ndarray, Context]:
        """:meth:`compress` of the concatenation of ``pieces`` (float32 arrays, each flattened,
        in order), read in place: the same payload and residual as
        ``compress(np.concatenate([p.reshape(-1) for p in pieces]), name)`` without writing
        the concatenation (data parallelism compresses a bucket of gradients this way). The
        tensor ``name`` has shape ``(total size,)``. Without error feedback, with momentum or
        with CuPy pieces, the pieces are concatenated first.

        Raises like :meth:`compress` (a bad piece is named by its position)."""
        pieces = [as_array(p, f"pieces[{i}]", gpu=True) for i, p in enumerate(pieces)]
        if any(is_cupy_array(p) for p in pieces):
            xp = select("topk", "cuda", np.float32).xp()
            return self.compress(xp.concatenate([p.reshape(-1) for p in pieces]), name)
        flats = [_as_float32(p, f"pieces[{i}]").reshape(-1) for i, p in enumerate(pieces)]
        if not self.error_feedback or self.momentum is not None:
            return self.compress(np.concatenate(flats) if flats else np.zeros(0, np.float32), name)
        n = sum(f.size for f in flats)
        slot = self._host_slot(name, (n,), n)
        payload = select("topk", "cpu", np.float32).compress_pieces(
            flats,
            self.k_for(n, self.ratio_at(slot.calls)),
            slot.residual,
            **self._options(name, slot.calls),
        )
        return self._stepped(slot, name, (n,), payload)

    def k_next(self, n: int, name: str | None = None) -> int:
        """How many entries the next compression of ``name`` (``n`` elements) sends."""
        n = _check_int("n", n, 0, self.max_elements)
        slot = self._slots.get(name)
        return self.k_for(n, self.ratio_at(0 if slot is None else slot.calls))

    def skip(self, n: int, name: str | None = None) -> None:
        """Counts a call of ``name`` (``n`` elements) that compressed nothing — its gradient
        was dropped, e.g. for being non-finite — keeping its warm-up stage in step with ranks
        that did compress; the error-feedback state stays as it was."""
        n = _check_int("n", n, 0, self.max_elements)
        slot = self._host_slot(name, (n,), n)
        slot.shape = (n,)
        slot.calls += 1
        self._slots[name] = slot

    def _options(self, name: str | None, calls: int) -> dict[str, Any]:
        """Selection and encoding options of one call (its seed depends on name and call)."""
        return {
            "method": self.method,
            "seed": _stream_seed(self.seed, name, calls),
            "exact_k": self.exact_k,
            "index": self.index,
            "values": self.values,
            "chunk": self.chunk,
        }

    def _host_slot(self, name: str | None, shape: tuple[int, ...], n: int) -> _Slot:
        """``name``'s state (created with zeroed buffers), after checking its shape."""
        slot = self._slots.get(name)
        if slot is not None and self.error_feedback and slot.shape != shape:
            raise ValueError(
                f"tensor {name!r} was compressed with shape {slot.shape}, now {shape}; "
                f"use another name or call reset({name!r}) first"
            )
        if slot is None:
            slot = _Slot(shape)
        if self.error_feedback:
            if self.momentum is None and slot.residual is None:
                slot.residual = np.zeros(n, dtype=np.float32)
            if self.momentum is not None and slot.velocity is None:
                slot.velocity = np.zeros(n, dtype=np.float32)
                slot.accumulator = np.zeros(n, dtype=np.float32)
        return slot

    def _stepped(
        self, slot: _Slot, name: str | None, shape: tuple[int, ...], payload: np.ndarray
    ) -> tuple[np.ndarray, Context]:
        """Records one more call of ``name`` (after a successful compression)."""
        slot.shape = shape
        slot.calls += 1
        self._slots[name] = slot
        return payload, Context(shape=shape, name=name, k=int(topk.header(payload)["k"]))

    def _compress_on_device(self, grad: Any, name: str | None) -> tuple[np.ndarray, Context]:
        """``compress`` for a CuPy gradient: selection and error feedback on the GPU."""
        kernels = select("topk", "cuda", np.float32)
        if self.momentum is not None or self.values != "f32":
            raise NotImplementedError(
                "TopK.compress of a CuPy array supports values='f32' without momentum only"
            )
        shape = tuple(grad.shape)
        slot = self._slots.get(name)
        if slot is not None and self.error_feedback and slot.shape != shape:
            raise ValueError(
                f"tensor {name!r} was compressed with shape {slot.shape}, now {shape}; "
                f"use another name or call reset({name!r}) first"
            )
        if slot is None:
            slot = _Slot(shape)
        n = int(grad.size)
        k = self.k_for(n, self.ratio_at(slot.calls))
        if self.error_feedback:
            xp = kernels.xp()
            if slot.residual is None:
                slot.residual = xp.zeros(n, dtype=np.float32)
            elif not is_cupy_array(slot.residual):  # state from a CPU run or a checkpoint
                slot.residual = xp.asarray(slot.residual)
            idx, vals = kernels.error_feedback(slot.residual, grad, k, self.method)
        else:
            idx, vals = kernels.select(grad, k, self.method)
        payload = topk.encode(
            n,
            idx.get().astype(np.uint32),
            vals.get(),
            index=self.index,
            value_format="f32",
            chunk=self.chunk,
        )
        slot.shape = shape
        slot.calls += 1
        self._slots[name] = slot
        return payload, Context(shape=shape, name=name, k=k)

    def residual(self, name: str | None = None) -> np.ndarray | None:
        """The error-feedback memory of ``name`` (the residual, or with momentum correction
        the accumulator ``v``), shaped like the gradient; a view, not a copy."""
        slot = self._slots.get(name)
        if slot is None:
            return None
        buf = slot.accumulator if self.momentum is not None else slot.residual
        return None if buf is None else buf.reshape(slot.shape)

    def reset(self, name: str | None = None) -> None:
        """Forgets the state of ``name`` (its residual, shape and warm-up count)."""
        self._slots.pop(name, None)

    def clear(self) -> None:
        """Forgets the state of every name."""
        self._slots.clear()

    def _config(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "method": self.method,
            "error_feedback": self.error_feedback,
            "momentum": self.momentum,
            "values": self.values,
            "index": self.index,
            "chunk": self.chunk,
            "exact_k": self.exact_k,
            "seed": self.seed,
            "warmup_steps": self.warmup_steps,
            "warmup_start": self.warmup_start,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: the config, and per name its shape, call
        count and error-feedback buffers (copies, float32)."""
        return {
            "version": _STATE_VERSION,
            "kind": "TopK",
            "config": self._config(),
            "slots": [
                {
                    "name": name,
                    "shape": list(slot.shape),
                    "calls": slot.calls,
                    **{k: v.copy() for k, v in slot.buffers().items()},
                }
                for name, slot in self._slots.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved. The error-feedback mode must match this
        compressor's (the buffers are different); other settings are taken from ``self``."""
        _check_state(state, "TopK")
        cfg = state["config"]
        if bool(cfg.get("error_feedback")) != self.error_feedback or (
            cfg.get("momentum") is None
        ) != (self.momentum is None):
            raise ValueError(
                "state was saved with error_feedback="
                f"{cfg.get('error_feedback')}, momentum={cfg.get('momentum')}; this compressor "
                f"has error_feedback={self.error_feedback}, momentum={self.momentum}"
            )
        wanted = []
        if self.error_feedback:
            wanted = ["residual"] if self.momentum is None else ["velocity", "accumulator"]
        slots: dict[str | None, _Slot] = {}
        for i, entry in enumerate(state["slots"]):
            shape = tuple(int(d) for d in entry["shape"])
            slot = _Slot(shape, calls=_check_int(f"slots[{i}].calls", entry["calls"], 0, 1 << 62))
            for key in wanted:
                buf = np.asarray(entry.get(key))
                if buf.dtype != np.float32 or buf.size != math.prod(shape):
                    raise ValueError(
                        f"slots[{i}].{key} must be float32 with {math.prod(shape)} elements, "
                        f"got {buf.dtype} with {buf.size}"
                    )
                setattr(slot, key, np.array(buf, dtype=np.float32).reshape(-1))
            slots[entry["name"]] = slot
        self._slots = slots


def _check_state(state: object, kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise ValueError(f"not a {kind} state dict")
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"{kind} state version {state.get('version')!r} is not {_STATE_VERSION}")


# --- dense int8 ------------------------------------------------------------------------------


class Int8(_Decoding):
    """Dense 8-bit quantization: every element as an int8 code, one float32 scale
    (``max|x| / 127``) per ``chunk`` elements; payload size ``44 + n + 4*ceil(n/chunk)``.

    Args:
        chunk: elements per scale.
        stochastic: round up or down at random in proportion (unbiased) instead of to the
            nearest; reproducible from ``seed``, the name and the call count.
        seed: seeds stochastic rounding.
        max_elements: largest n ``decompress`` allocates from a header alone.

    Attributes:
        allreduce_compatible: False: each payload has its own scales, so int8 codes from
            different ranks cannot be summed element-wise; use :meth:`decompress_sum`.
    """

    allreduce_compatible = False

    def __init__(
        self,
        chunk: int = 256,
        *,
        stochastic: bool = False,
        seed: int = 0,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        self.chunk = _check_int("chunk", chunk, 1, MAX_CHUNK)
        self.stochastic = bool(stochastic)
        self.seed = _check_int("seed", seed, 0, (1 << 64) - 1)
        self.max_elements = _check_int("max_elements", max_elements, 0, 1 << 62)
        self._calls: dict[str | None, int] = {}

    def __repr__(self) -> str:
        return f"Int8(chunk={self.chunk}, stochastic={self.stochastic})"

    def compress(self, grad: Any, name: str | None = None) -> tuple[np.ndarray, Context]:
        """Quantizes ``grad`` (float32, any shape; numpy or CPU DLPack) without copying it.
        Raises like :meth:`TopK.compress`."""
        arr = _as_float32(grad, "grad")
        calls = self._calls.get(name, 0)
        payload = topk.int8(
            arr.reshape(-1),
            chunk=self.chunk,
            stochastic=self.stochastic,
            seed=_stream_seed(self.seed, name, calls),
        )
        self._calls[name] = calls + 1
        return payload, Context(shape=tuple(arr.shape), name=name, k=arr.size)

    def state_dict(self) -> dict[str, Any]:
        """The config and each name's call count (which seeds stochastic rounding)."""
        return {
            "version": _STATE_VERSION,
            "kind": "Int8",
            "config": {"chunk": self.chunk, "stochastic": self.stochastic, "seed": self.seed},
            "calls": [{"name": k, "calls": v} for k, v in self._calls.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved."""
        _check_state(state, "Int8")
        self._calls = {
            e["name"]: _check_int("calls", e["calls"], 0, 1 << 62) for e in state["calls"]
        }
