"""The GPU kernels (``cuda/*.cu``) and the host code that drives them, for CuPy arrays.

Each public function here takes device arrays and returns device arrays; it validates its
inputs (dtype, shape, contiguity, device), chooses the launch shape and runs the kernels of
one family through a :class:`Backend`:

- :class:`CupyBackend` (the default) compiles each family once per device and option set
  with ``cupy.RawModule`` (lazily, on first use) from the sources shipped in the wheel, with
  ``#line 1 "cuda/<family>.cu"`` prepended, and checks before every launch that each array is
  a C-contiguous CuPy array on the current device and each scalar is ``int32``, ``uint32`` or
  ``float32`` (CuPy itself checks nothing);
- the test suite's CPU emulation provides another backend over numpy arrays, so this exact host
  code is exercised on machines without a GPU.

Exactness, compared with the CPU kernels in ``moecore._core``:

- top-k selection is exact and returns the same indices (increasing, ties to the lower index)
  and values as the CPU's exact method, for ``method="exact"`` and ``"sampled"`` alike (the
  sampled threshold only narrows the candidates; ``exact_k=False`` does not apply); error
  feedback leaves the same residual bit for bit (f32 values);
- decompression scatter and AdamW are bit-identical (no fused multiply-add);
- MoE routing picks the same experts unless two choice scores are within rounding of each
  other (``expf`` differs by an ulp or two from the CPU's); permutation orders and counts are
  identical; unpermute, its backward and the BSR products agree to float rounding.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from moecore.errors import NonFiniteGradient
from moecore.kernels import cuda_sources

# Threads per block for every launch. A multiple of 32: the warp code (ballots, shuffles with
# the full mask, moe_unpermute_backward's warp-uniform guards) needs whole warps. A power of two:
# the kernels compute `blockIdx.x * blockDim.x + threadIdx.x` (unsigned) into an int, and for
# n <= 2^31 - 1 elements a grid of ceil(n / THREADS) blocks ends at thread
# ceil(n / THREADS) * THREADS - 1 <= 2^31 - 1 exactly because THREADS divides 2^31, so that int
# never overflows and the `i >= n` guard holds on the last block. Every count a kernel takes as
# an int is checked below 2^31 first (`_check`, `_int32_count`). At most 256: moe_build_order
# runs in one block of at most MOE_ORDER_TILE = 256 threads.
THREADS = 256
_MAX_GRID = 1024  # grid-stride kernels (the top-k histogram) use at most this many blocks
_INT_MAX = 2**31 - 1


class Backend(Protocol):
    """Where kernels run: an array module and a checked launch."""

    xp: Any

    def launch(
        self, family: str, name: str, grid: tuple[int, ...], block: tuple[int, ...], *args: Any
    ) -> None:
        """Runs kernel ``name`` of ``family`` over ``grid`` x ``block``."""
        ...

    def to_host(self, a: Any) -> np.ndarray:
        """A numpy copy of device array ``a``."""
        ...


class CupyBackend:
    """Kernels compiled by NVRTC through ``cupy.RawModule``, cached per device and options."""

    def __init__(self, options: tuple[str, ...] = ()) -> None:
        import cupy  # lazy: only the GPU path needs CuPy

        self.xp = cupy
        self.options = options
        self._modules: dict[tuple[str, int, tuple[str, ...]], Any] = {}

    def module(self, family: str) -> Any:
        """The compiled ``cupy.RawModule`` of ``family`` on the current device."""
        device = int(self.xp.cuda.Device().id)
        key = (family, device, self.options)
        mod = self._modules.get(key)
        if mod is None:
            mod = self.xp.RawModule(code=cuda_sources.source(family), options=self.options)
            self._modules[key] = mod
        return mod

    def launch(
        self, family: str, name: str, grid: tuple[int, ...], block: tuple[int, ...], *args: Any
    ) -> None:
        """Checks every argument, then launches ``family.name`` on the current stream."""
        device = int(self.xp.cuda.Device().id)
        passed: list[Any] = []
        for i, a in enumerate(args):
            if a is None:
                passed.append(np.uint64(0))  # a null pointer
            elif isinstance(a, self.xp.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{name}: argument {i} is not C-contiguous")
                if int(a.device.id) != device:
                    raise ValueError(
                        f"{name}: argument {i} is on device {a.device.id}, "
                        f"the current device is {device}"
                    )
                passed.append(a)
            elif isinstance(a, np.int32 | np.uint32 | np.float32):
                passed.append(a)
            else:
                raise TypeError(f"{name}: argument {i} is {type(a).__name__}, not a typed scalar")
        self.module(family).get_function(name)(grid, block, tuple(passed))

    def to_host(self, a: Any) -> np.ndarray:
        """``cupy.asnumpy``."""
        return self.xp.asnumpy(a)


_default: CupyBackend | None = None


def default_backend() -> CupyBackend:
    """The process-wide CuPy backend (created on first use)."""
    global _default
    if _default is None:
        _default = CupyBackend()
    return _default


def _be(backend: Backend | None) -> Backend:
    return default_backend() if backend is None else backend


def _blocks(n: int) -> int:
    return max(1, -(-n // THREADS))


def _check(be: Backend, a: Any, name: str, dtype: Any, ndim: int | None = None) -> Any:
    """``a`` if it is a C-contiguous array of the backend with this dtype (and ndim)."""
    if not isinstance(a, be.xp.ndarray):
        raise TypeError(f"{name}: expected a {be.xp.__name__} array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array")
    if a.size > _INT_MAX:
        raise ValueError(f"{name}: {a.size} elements, the GPU kernels index with int32")
    return a


def _int32_count(v: int, what: str) -> int:
    """``v`` if the kernels can index it with int32, else a ``ValueError`` naming ``what``;
    called before anything of that size is allocated."""
    if not 0 <= v <= _INT_MAX:
        raise ValueError(f"{what} = {v} exceeds the int32 indexing of the GPU kernels (2^31 - 1)")
    return v


def _i32(v: int) -> np.int32:
    return np.int32(_int32_count(v, "a kernel argument"))


# --- top-k ----------------------------------------------------------------------------------

_NONFINITE_DIGIT = 0x7F800000 >> 20  # first-pass digits at or above it hold NaN / ±inf


def topk_select(
    x: Any, k: int, backend: Backend | None = None, method: str = "exact"
) -> tuple[Any, Any]:
    """The k entries of float32 ``x`` (any shape, read flat) with the largest magnitude.

    Returns ``(idx, values)``: int32 indices, increasing, ties to the lower index, and the
    float32 values there. ``ValueError`` on NaN/±inf (naming the first index) or a bad k.

    ``method="exact"``: three radix-histogram passes over ``x`` find the k-th largest key,
    one compaction pass writes the result. ``"sampled"`` (Deep Gradient Compression): a
    threshold from a strided sample, one counting pass (lowered ×0.8 up to 10 times while
    fewer than k pass), one compaction of the candidates at or above it, then the exact
    method on the candidates only; the result is identical to ``"exact"`` (it falls back to
    it when the threshold cannot be corrected).
    """
    be = _be(backend)
    x = _check(be, x, "x", np.float32).reshape(-1)
    n = int(x.size)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n = {n}], got {k}")
    if method not in ("exact", "sampled"):
        raise ValueError(f'method must be "exact" or "sampled", got {method!r}')
    if method == "sampled" and 0 < k < n:
        picked = _sampled_select(be, x, k)
        if picked is not None:
            return picked
    return _exact_select(be, x, k)


_SAMPLE_MIN = 1024
_MAX_ROUNDS = 10


def _sampled_select(be: Backend, x: Any, k: int) -> tuple[Any, Any] | None:
    """The sampled method, or None when its threshold cannot be corrected in time."""
    xp = be.xp
    n = int(x.size)
    stride = max(1, n // max(_SAMPLE_MIN, n // 100))
    sample = be.to_host(xp.abs(x[::stride]))
    kk = min(sample.size, max(1, -(-k * sample.size // n)))
    threshold = np.float32(np.partition(sample, sample.size - kk)[sample.size - kk]) * np.float32(
        0.9
    )
    count = xp.zeros(1, np.uint32)
    for _ in range(_MAX_ROUNDS):
        key = int(np.float32(threshold).view(np.uint32)) & 0x7FFFFFFF
        if key == 0 or not np.isfinite(threshold):
            return None  # everything passes (or the sample held NaN/inf): exact method
        count.fill(0)
        be.launch(
            "topk",
            "topk_count_at_least",
            (min(_blocks(n), _MAX_GRID),),
            (THREADS,),
            x,
            _i32(n),
            np.uint32(key),
            count,
        )
        passed = int(be.to_host(count)[0])
        if passed >= k:
            break
        threshold = np.float32(threshold * np.float32(0.8))
    else:
        return None
    # Candidates: every key >= threshold (keys > threshold - 1, no ties), in index order.
    cand_idx, cand_val = _compact(be, x, key - 1, 0, passed)
    try:
        pos, val = _exact_select(be, cand_val, k)
    except ValueError:
        _raise_if_nonfinite(be, x)  # name the index in x, not among the candidates
        raise
    return cand_idx[pos], val


def _exact_select(be: Backend, x: Any, k: int) -> tuple[Any, Any]:
    xp = be.xp
    n = int(x.size)
    if n == 0 or k == 0:
        _raise_if_nonfinite(be, x)
        return xp.zeros(0, np.int32), xp.zeros(0, np.float32)
    hist = xp.zeros(2048, np.uint32)
    prefix, mask, remaining = 0, 0, k
    grid = (min(_blocks(n), _MAX_GRID),)
    for shift in (20, 9, 0):
        hist.fill(0)
        be.launch(
            "topk",
            "topk_radix_histogram",
            grid,
            (THREADS,),
            x,
            _i32(n),
            np.uint32(prefix),
            np.uint32(mask),
            _i32(shift),
            hist,
        )
        h = be.to_host(hist).astype(np.int64)
        if shift == 20 and h[_NONFINITE_DIGIT:].any():
            _raise_if_nonfinite(be, x)
        from_top = np.cumsum(h[::-1])
        j = int(np.searchsorted(from_top, remaining))  # first digit (from the top) reaching k
        digit = 2047 - j
        remaining -= int(from_top[j] - h[digit])
        prefix |= digit << shift
        mask |= 2047 << shift
    kth_key, ties = prefix, remaining  # take the first `ties` entries whose key equals kth_key
    return _compact(be, x, kth_key, ties, k)


def _compact(be: Backend, x: Any, kth_key: int, ties: int, k: int) -> tuple[Any, Any]:
    """The k entries with key > kth_key or (key == kth_key and among the first `ties` such),
    in increasing index order: tile counts, exclusive scans, compaction."""
    xp = be.xp
    n = int(x.size)
    tiles = _blocks(n)
    gt = xp.zeros(tiles, np.uint32)
    eq = xp.zeros(tiles, np.uint32)
    be.launch(
        "topk", "topk_tile_counts", (tiles,), (THREADS,), x, _i32(n), np.uint32(kth_key), gt, eq
    )
    gt_before = _exclusive_cumsum(xp, gt)
    eq_before = _exclusive_cumsum(xp, eq)
    idx = xp.empty(k, np.int32)
    val = xp.empty(k, np.float32)
    be.launch(
        "topk",
        "topk_compact",
        (tiles,),
        (THREADS,),
        x,
        _i32(n),
        np.uint32(kth_key),
        np.uint32(ties),
        gt_before,
        eq_before,
        idx,
        val,
    )
    return idx, val


def _exclusive_cumsum(xp: Any, a: Any) -> Any:
    out = xp.zeros(a.size, np.uint32)
    if a.size > 1:
        out[1:] = xp.cumsum(a[:-1], dtype=np.uint32)
    return out


def _raise_if_nonfinite(be: Backend, x: Any) -> None:
    bad = be.to_host(be.xp.nonzero(~be.xp.isfinite(x))[0])
    if bad.size:
        i = int(bad[0])
        raise NonFiniteGradient(f"gradient has a non-finite value {float(x[i])} at index {i}")


def topk_error_feedback(
    residual: Any, grad: Any, k: int, backend: Backend | None = None, method: str = "exact"
) -> tuple[Any, Any]:
    """Error-feedback top-k with f32 values: ``residual += grad``, select the top k of the
    residual, clear the sent entries. Returns ``(idx, values)``. A non-finite gradient raises
    ``ValueError`` before the residual is touched."""
    be = _be(backend)
    r = _check(be, residual, "residual", np.float32).reshape(-1)
    g = _check(be, grad, "grad", np.float32).reshape(-1)
    if r.size != g.size:
        raise ValueError(f"grad has {g.size} elements, the residual {r.size}")
    _raise_if_nonfinite(be, g)
    n = int(r.size)
    if n:
        be.launch("topk", "topk_residual_accumulate", (_blocks(n),), (THREADS,), r, g, _i32(n))
    idx, val = topk_select(r, k, be, method)
    if k:
        be.launch(
            "topk", "topk_residual_update", (_blocks(k),), (THREADS,), r, _i32(n), idx, val, _i32(k)
        )
    return idx, val


# --- decompression --------------------------------------------------------------------------


def scatter(
    out: Any,
    idx: Any,
    values: Any,
    *,
    scale: float = 1.0,
    add: bool = False,
    backend: Backend | None = None,
) -> Any:
    """``out[idx] = values`` (after zeroing ``out``) or ``out[idx] += scale * values``.

    ``idx`` int32, strictly increasing and in range (as a decoded payload's are: checked by the
    codec on the host), ``values`` float32 of the same length. Returns ``out``.
    """
    be = _be(backend)
    flat = _check(be, out, "out", np.float32).reshape(-1)
    idx = _check(be, idx, "idx", np.int32, 1)
    values = _check(be, values, "values", np.float32, 1)
    if idx.size != values.size:
        raise ValueError(f"idx has {idx.size} entries, values {values.size}")
    n, k = int(flat.size), int(idx.size)
    if not add:
        flat.fill(0)
    if k == 0:
        return out
    if add:
        be.launch(
            "codec",
            "codec_scatter_add",
            (_blocks(k),),
            (THREADS,),
            flat,
            _i32(n),
            idx,
            values,
            _i32(k),
            np.float32(scale),
        )
    else:
        be.launch(
            "codec", "codec_scatter", (_blocks(k),), (THREADS,), flat, _i32(n), idx, values, _i32(k)
        )
    return out


# --- AdamW ----------------------------------------------------------------------------------


def adamw_scalars(
    lr: float, beta1: float, beta2: float, weight_decay: float, step: int
) -> tuple[np.float32, np.float32, np.float32]:
    """``(step_size, inv_sqrt_bc2, decay)`` computed in float32 as the CPU kernel does."""
    f = np.float32
    t = min(step, _INT_MAX)
    bc1 = f(1.0) - f(_powi(float(f(beta1)), t))
    bc2 = f(1.0) - f(_powi(float(f(beta2)), t))
    step_size = f(lr) / bc1
    inv_sqrt_bc2 = f(1.0) / np.sqrt(bc2)
    decay = f(1.0) - f(lr) * f(weight_decay)
    return f(step_size), f(inv_sqrt_bc2), f(decay)


def _powi(b: float, e: int) -> float:
    """``b ** e`` by binary powering in float64, like LLVM's ``powi``."""
    result = 1.0
    while e:
        if e & 1:
            result *= b
        b *= b
        e >>= 1
    return result


def adamw_step(
    p: Any,
    g: Any,
    m: Any,
    v: Any,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    backend: Backend | None = None,
) -> None:
    """One fused AdamW step on one tensor, in place (``p``, ``m``, ``v`` updated)."""
    be = _be(backend)
    arrays = [
        _check(be, a, name, np.float32) for a, name in ((p, "p"), (g, "g"), (m, "m"), (v, "v"))
    ]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"p, g, m, v sizes differ: {[a.size for a in arrays]}")
    if step < 1:
        raise ValueError(f"step must be at least 1, got {step}")
    step_size, inv_sqrt_bc2, decay = adamw_scalars(lr, beta1, beta2, weight_decay, step)
    n = int(arrays[0].size)
    if n:
        be.launch(
            "adamw",
            "adamw_step",
            (_blocks(n),),
            (THREADS,),
            *arrays,
            _i32(n),
            np.float32(beta1),
            np.float32(beta2),
            np.float32(eps),
            step_size,
            inv_sqrt_bc2,
            decay,
        )


# --- MoE ------------------------------------------------------------------------------------


def moe_route(
    logits: Any,
    k: int,
    score: str = "softmax",
    bias: Any = None,
    normalize: bool = True,
    backend: Backend | None = None,
) -> tuple[Any, Any, Any]:
    """``(expert_idx [T, k] int32, weights [T, k], probs [T, E])``; see
    :func:`moecore.moe_kernels.route` (group-limited routing has no GPU kernel)."""
    be = _be(backend)
    xp = be.xp
    logits = _check(be, logits, "logits", np.float32, 2)
    t, e = logits.shape
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f'score: expected "softmax" or "sigmoid", got {score!r}')
    if not 1 <= k <= e:
        raise ValueError(f"k must be in [1, E = {e}], got {k}")
    if bias is not None:
        bias = _check(be, bias, "bias", np.float32, 1)
        if bias.shape != (e,):
            raise ValueError(f"bias: expected shape ({e},), got {bias.shape}")
    idx = xp.empty((t, k), np.int32)
    w = xp.empty((t, k), np.float32)
    probs = xp.empty((t, e), np.float32)
    if t:
        be.launch(
            "moe",
            "moe_route",
            (_blocks(t),),
            (THREADS,),
            logits,
            bias,
            _i32(t),
            _i32(e),
            _i32(k),
            _i32(0 if score == "softmax" else 1),
            _i32(int(normalize)),
            idx,
            w,
            probs,
        )
    return idx, w, probs


def moe_permute(
    x: Any, expert_idx: Any, n_experts: int, pad_to: int = 1, backend: Backend | None = None
) -> tuple[Any, Any, Any]:
    """``(x_sorted, order, counts)``; see :func:`moecore.moe_kernels.permute` (without
    ``capacity``: dropping by capacity has no GPU kernel)."""
    be = _be(backend)
    xp = be.xp
    x = _check(be, x, "x", np.float32, 2)
    expert_idx = _check(be, expert_idx, "expert_idx", np.int32, 2)
    t, k = expert_idx.shape
    if x.shape[0] != t:
        raise ValueError(f"x has {x.shape[0]} rows, expert_idx {t}")
    if not 1 <= n_experts <= 1024:
        raise ValueError(f"n_experts must be in [1, 1024] on the GPU, got {n_experts}")
    if pad_to < 1:
        raise ValueError(f"pad_to must be at least 1, got {pad_to}")
    if expert_idx.size and (int(expert_idx.min()) < 0 or int(expert_idx.max()) >= n_experts):
        raise ValueError(f"expert_idx: values must be in [0, {n_experts})")
    n = int(expert_idx.size)
    counts = xp.zeros(n_experts, np.int32)
    if n:
        be.launch(
            "moe",
            "moe_count",
            (_blocks(n),),
            (THREADS,),
            expert_idx,
            _i32(n),
            _i32(n_experts),
            counts,
        )
    # Padding and the experts' first rows on the host, in int64 (at most 1024 experts): in
    # int32 a large pad_to wraps, and wrapped starts would send moe_build_order's writes out
    # of `order`. The sizes are checked before anything of that size is allocated.
    padded_h = -(-be.to_host(counts).astype(np.int64) // pad_to) * pad_to
    d = int(x.shape[1])
    rows = _int32_count(int(padded_h.sum()), "the padded row count")
    _int32_count(rows * d, f"{rows} sorted rows x d = {d}")
    padded = xp.asarray(padded_h.astype(np.int32))
    starts = xp.asarray((np.cumsum(padded_h) - padded_h).astype(np.int32))
    order = xp.full(rows, -1, np.int32)
    pos = xp.full(n, -1, np.int32)
    if n:
        be.launch(
            "moe",
            "moe_build_order",
            (1,),
            (THREADS,),
            expert_idx,
            _i32(n),
            _i32(n_experts),
            starts,
            order,
            pos,
        )
    x_sorted = xp.empty((rows, d), np.float32)
    if rows * d:
        be.launch(
            "moe",
            "moe_permute_rows",
            (_blocks(rows * d),),
            (THREADS,),
            x,
            order,
            _i32(rows * d),
            _i32(d),
            _i32(k),
            x_sorted,
        )
    return x_sorted, order, padded


def _positions(be: Backend, order: Any, n_tokens: int, k: int) -> Any:
    """``pos[f]`` = the sorted row holding assignment f (-1 if dropped): order's inverse.

    Validates ``order`` as the CPU does (values in ``[-1, T*k)``, no assignment twice, T*k
    below 2^31): the kernels index ``pos``, the weights and ``d_weights`` with its values, and
    an assignment held by two rows would be written by two warps at once."""
    xp = be.xp
    n_assign = _int32_count(n_tokens * k, f"n_tokens * k = {n_tokens} * {k}")
    if order.size and (int(order.min()) < -1 or int(order.max()) >= n_assign):
        raise ValueError(f"order: values must be in [-1, {n_assign})")
    pos = xp.full(n_assign, -1, np.int32)
    rows = xp.nonzero(order >= 0)[0]
    if rows.size:
        pos[order[rows]] = rows.astype(np.int32)
        if int((pos >= 0).sum()) != int(rows.size):
            raise ValueError("order: an assignment appears in more than one row")
    return pos


def moe_unpermute(
    y_sorted: Any,
    order: Any,
    weights: Any = None,
    n_tokens: int | None = None,
    k: int | None = None,
    backend: Backend | None = None,
) -> Any:
    """``y [T, d]``; see :func:`moecore.moe_kernels.unpermute` (weights may be None, given
    ``n_tokens`` and ``k``: that is permute's backward)."""
    be = _be(backend)
    xp = be.xp
    y_sorted = _check(be, y_sorted, "y_sorted", np.float32, 2)
    order = _check(be, order, "order", np.int32, 1)
    if weights is not None:
        weights = _check(be, weights, "weights", np.float32, 2)
        n_tokens, k = weights.shape
    if n_tokens is None or k is None or k < 1:
        raise ValueError("unpermute needs weights, or n_tokens and k >= 1")
    if order.shape[0] != y_sorted.shape[0]:
        raise ValueError(f"order has {order.shape[0]} rows, y_sorted {y_sorted.shape[0]}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    d = int(y_sorted.shape[1])
    _int32_count(n_tokens * d, f"n_tokens * d = {n_tokens} * {d}")
    pos = _positions(be, order, n_tokens, k)
    y = xp.empty((n_tokens, d), np.float32)
    if n_tokens * d:
        be.launch(
            "moe",
            "moe_unpermute",
            (_blocks(n_tokens * d),),
            (THREADS,),
            y_sorted,
            pos,
            weights,
            _i32(n_tokens * d),
            _i32(d),
            _i32(k),
            y,
        )
    return y


def moe_permute_backward(
    dx_sorted: Any, order: Any, n_tokens: int, k: int, backend: Backend | None = None
) -> Any:
    """``dx [T, d]``: each token's sorted rows summed back; see
    :func:`moecore.moe_kernels.permute_backward`."""
    return moe_unpermute(dx_sorted, order, None, n_tokens, k, backend)


def moe_unpermute_backward(
    dy: Any, y_sorted: Any, order: Any, weights: Any, backend: Backend | None = None
) -> tuple[Any, Any]:
    """``(d_y_sorted, d_weights)``; see :func:`moecore.moe_kernels.unpermute_backward`."""
    be = _be(backend)
    xp = be.xp
    dy = _check(be, dy, "dy", np.float32, 2)
    y_sorted = _check(be, y_sorted, "y_sorted", np.float32, 2)
    order = _check(be, order, "order", np.int32, 1)
    weights = _check(be, weights, "weights", np.float32, 2)
    t, k = weights.shape
    rows, d = y_sorted.shape
    if dy.shape != (t, d) or order.shape != (rows,):
        raise ValueError(
            f"dy must be ({t}, {d}) and order ({rows},); got {dy.shape}, {order.shape}"
        )
    _positions(be, order, t, k)  # validation only: the kernel reads weights[order[r]]
    d_y_sorted = xp.empty((rows, d), np.float32)
    d_weights = xp.zeros((t, k), np.float32)
    if rows:
        warps_per_block = THREADS // 32
        be.launch(
            "moe",
            "moe_unpermute_backward",
            (-(-rows // warps_per_block),),
            (THREADS,),
            dy,
            y_sorted,
            order,
            weights,
            _i32(rows),
            _i32(d),
            _i32(k),
            d_y_sorted,
            d_weights,
        )
    return d_y_sorted, d_weights


# --- block-sparse ---------------------------------------------------------------------------


class BsrDevice:
    """A BSR pattern's index arrays on the device, in the kernels' int32 form, plus the
    transposed (block-column) view ``bsr_dx`` needs; built once per pattern."""

    def __init__(
        self, shape: tuple[int, int], block: int, indptr: Any, indices: Any, backend: Any = None
    ) -> None:
        be = _be(backend)
        xp = be.xp
        self.shape = (int(shape[0]), int(shape[1]))
        self.block = int(block)
        ip = np.asarray(indptr, dtype=np.int64).reshape(-1)
        ix = np.asarray(indices, dtype=np.int64).reshape(-1)
        _check_bsr_pattern(self.shape, self.block, ip, ix)
        block_row = np.repeat(np.arange(ip.size - 1), np.diff(ip))
        by_col = np.lexsort((block_row, ix))  # block-columns in turn, block-rows increasing
        t_indptr = np.zeros(self.shape[1] // self.block + 1, np.int64)
        np.add.at(t_indptr, ix + 1, 1)
        self.indptr = xp.asarray(ip.astype(np.int32))
        self.indices = xp.asarray(ix.astype(np.int32))
        self.block_row = xp.asarray(block_row.astype(np.int32))
        self.t_indptr = xp.asarray(np.cumsum(t_indptr).astype(np.int32))
        self.t_row = xp.asarray(block_row[by_col].astype(np.int32))
        self.t_block = xp.asarray(by_col.astype(np.int32))
        self.nnzb = int(ix.size)


def _check_bsr_pattern(shape: tuple[int, int], b: int, ip: np.ndarray, ix: np.ndarray) -> None:
    """What keeps every index of the BSR kernels in bounds: the kernels read
    ``indptr[o / b + 1]``, ``x[row, indices[blk] * b + j]`` and ``data[blk]`` unchecked."""
    rows, cols = shape
    if b < 1 or rows < 0 or cols < 0 or rows % b or cols % b:
        raise ValueError(f"shape {shape} must be non-negative multiples of the block {b}")
    _int32_count(max(rows, cols), f"the larger dimension of {shape}")  # o and c are ints
    if ip.size != rows // b + 1 or ip[0] != 0 or np.any(np.diff(ip) < 0):
        raise ValueError(f"indptr must be {rows // b + 1} non-decreasing offsets from 0")
    if ip[-1] != ix.size:
        raise ValueError(f"indptr ends at {ip[-1]}, indices has {ix.size} entries")
    if ix.size and (ix.min() < 0 or ix.max() >= cols // b):
        raise ValueError(f"indices must be block-columns in [0, {cols // b})")


def bsr_linear(x: Any, w: BsrDevice, data: Any, bias: Any = None, backend: Any = None) -> Any:
    """``y = x @ W.T (+ bias)`` for ``x [M, in]``; ``data [nnzb, B, B]`` float32."""
    be = _be(backend)
    out_f, in_f = w.shape
    x = _check(be, x, "x", np.float32, 2)
    data = _check(be, data, "data", np.float32, 3)
    if x.shape[1] != in_f or data.shape != (w.nnzb, w.block, w.block):
        raise ValueError(f"x must be (M, {in_f}) and data ({w.nnzb}, {w.block}, {w.block})")
    if bias is not None:
        bias = _check(be, bias, "bias", np.float32, 1)
        if bias.shape != (out_f,):
            raise ValueError(f"bias: expected shape ({out_f},), got {bias.shape}")
    m = int(x.shape[0])
    _int32_count(m * out_f, f"M * out_features = {m} * {out_f}")
    y = be.xp.empty((m, out_f), np.float32)
    if m * out_f:
        be.launch(
            "bsr",
            "bsr_forward",
            (_blocks(m * out_f),),
            (THREADS,),
            x,
            _i32(m * out_f),
            _i32(in_f),
            _i32(out_f),
            _i32(w.block),
            w.indptr,
            w.indices,
            data,
            bias,
            y,
        )
    return y


def bsr_linear_dx(dy: Any, w: BsrDevice, data: Any, backend: Any = None) -> Any:
    """``dx = dy @ W`` for ``dy [M, out]``."""
    be = _be(backend)
    out_f, in_f = w.shape
    dy = _check(be, dy, "dy", np.float32, 2)
    data = _check(be, data, "data", np.float32, 3)
    if dy.shape[1] != out_f or data.shape != (w.nnzb, w.block, w.block):
        raise ValueError(f"dy must be (M, {out_f}) and data ({w.nnzb}, {w.block}, {w.block})")
    m = int(dy.shape[0])
    _int32_count(m * in_f, f"M * in_features = {m} * {in_f}")
    dx = be.xp.empty((m, in_f), np.float32)
    if m * in_f:
        be.launch(
            "bsr",
            "bsr_dx",
            (_blocks(m * in_f),),
            (THREADS,),
            dy,
            _i32(m * in_f),
            _i32(out_f),
            _i32(in_f),
            _i32(w.block),
            w.t_indptr,
            w.t_row,
            w.t_block,
            data,
            dx,
        )
    return dx


def bsr_linear_dw(dy: Any, x: Any, w: BsrDevice, backend: Any = None) -> Any:
    """``dW`` at the kept blocks only (SDDMM): ``[nnzb, B, B]``."""
    be = _be(backend)
    out_f, in_f = w.shape
    dy = _check(be, dy, "dy", np.float32, 2)
    x = _check(be, x, "x", np.float32, 2)
    if dy.shape[1] != out_f or x.shape[1] != in_f or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy must be (M, {out_f}) and x (M, {in_f}); got {dy.shape}, {x.shape}")
    b = w.block
    n = _int32_count(w.nnzb * b * b, f"nnzb * B * B = {w.nnzb} * {b} * {b}")
    dw = be.xp.empty((w.nnzb, b, b), np.float32)
    if n:
        be.launch(
            "bsr",
            "bsr_sddmm",
            (_blocks(n),),
            (THREADS,),
            dy,
            x,
            _i32(n),
            _i32(int(dy.shape[0])),
            _i32(out_f),
            _i32(in_f),
            _i32(b),
            w.block_row,
            w.indices,
            dw,
        )
    return dw


def launch_grid(n: int) -> int:
    """Blocks of :data:`THREADS` threads covering n items (exposed for the benchmarks)."""
    return _blocks(n)


__all__ = [
    "THREADS",
    "Backend",
    "BsrDevice",
    "CupyBackend",
    "adamw_scalars",
    "adamw_step",
    "bsr_linear",
    "bsr_linear_dw",
    "bsr_linear_dx",
    "default_backend",
    "launch_grid",
    "moe_permute",
    "moe_permute_backward",
    "moe_route",
    "moe_unpermute",
    "moe_unpermute_backward",
    "scatter",
    "topk_error_feedback",
    "topk_select",
]
