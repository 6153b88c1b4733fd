"""``DataParallel``: gradients averaged over a group, sent during backward.

Each parameter gets a post-accumulate-grad hook. When backward finishes a parameter's
gradient (the autograd engine does so as soon as its last consumer ran), the hook tells the
:class:`moecore.comm.Scheduler`, which answers with the collectives to start (a bucket's
gradients are copied into its flat buffer as it goes out; a compressed bucket is compressed
straight from them); they are non-blocking, and every hook also drives the ones
in flight (MPI moves bytes only while called into). :meth:`DataParallel.finish` — call it
between ``loss.backward()`` and ``optimizer.step()`` — sends what is left (gradients that
never became ready this step, e.g. experts that got no token, go as zeros so no rank waits
forever), waits, and writes the averages back into ``.grad``.

Compressed buckets go through :class:`moecore.compress.TopK` with error feedback (a
residual per bucket), all-gather the payloads and sum them with
:func:`moecore.compress.decompress_sum`.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from moecore.comm import Action, GradSpec, Scheduler
from moecore.compress import TopK
from moecore.distributed.agreement import check_ranks_agree
from moecore.distributed.driver import Driver
from moecore.distributed.group import Group, Request
from moecore.distributed.watchdog import check_timeout
from moecore.errors import NonFiniteGradient

__all__ = ["DataParallel", "parse_compress"]

_LIMIT = "DataParallel(timeout=...), comm_timeout_s in a run's config"


#: ``wire_dtype`` → the numpy dtype of the bucket on the wire.
WIRE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def parse_compress(spec: str | TopK | None) -> TopK | None:
    """``None``/``"none"`` → None; ``"topk:0.01"`` → ``TopK(ratio=0.01)`` with error
    feedback; a :class:`TopK` is used as given."""
    if spec is None or isinstance(spec, TopK):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"compress must be None, 'topk:<ratio>' or a TopK, got {type(spec).__name__}"
        )
    if spec in ("", "none"):
        return None
    m = re.fullmatch(r"topk:([0-9.eE+-]+)", spec)
    if m is None:
        raise ValueError(
            f"compress must be 'none' or 'topk:<ratio>' (e.g. topk:0.01), got {spec!r}"
        )
    try:
        ratio = float(m.group(1))
    except ValueError:
        raise ValueError(f"compress: {m.group(1)!r} is not a number") from None
    return TopK(ratio=ratio, error_feedback=True)


def _payload_bound(c: TopK, n: int, k: int) -> int:
    """Largest payload :class:`TopK` makes for n elements and k sent (see the wire format in
    :mod:`moecore.compress`); the same on every rank since k is (``exact_k``)."""
    index = {"auto": 4 * k, "raw": 4 * k, "varint": 5 * k, "bitmap": -(-n // 8), "dense": 0}
    values = {"f32": 4 * k, "f16": 2 * k, "bf16": 2 * k, "int8": k + 4 * -(-k // c.chunk)}
    return 44 + index[c.index] + values[c.values]


def _wire_format(c: TopK | None) -> dict[str, Any] | None:
    """What of a compressor decides the size of what each rank sends (must agree on every
    rank); its local state (error feedback, momentum, seed) may differ."""
    if c is None:
        return None
    keys = ("ratio", "values", "index", "chunk", "exact_k", "warmup_steps", "warmup_start")
    return {k: getattr(c, k) for k in keys}


def _layers(names: list[str]) -> list[int]:
    """Layer index per parameter: the owning modules numbered in registration order."""
    owners: dict[str, int] = {}
    out = []
    for name in names:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        out.append(owners.setdefault(owner, len(owners)))
    return out


class DataParallel:
    """Averages ``model``'s gradients over ``group`` while backward runs.

    Args:
        model: an :class:`moecore.nn.Module`; its parameters are broadcast from rank 0.
        group: the data-parallel group (:func:`moecore.distributed.init`).
        bucket_mb: bucket cap in MiB (the first bucket uses ``first_bucket_mb``).
        policy: ``"fifo"`` or ``"priority"`` (see :mod:`moecore.comm`).
        compress: None, ``"topk:<ratio>"`` or a :class:`moecore.compress.TopK`.
        first_bucket_mb, partition_mb, credit_mb, warmup_steps, compress_when: scheduler
            settings (see :class:`moecore.comm.Scheduler`).
        progress: how requests in flight progress: ``"hooks"`` (tested at every gradient
            hook) or ``"thread"`` (also a polling thread; see :mod:`moecore.distributed.driver`).
        gradient_as_bucket_view: as in PyTorch's DDP. False: :meth:`finish` copies the
            averages into each ``.grad``. True: each ``.grad`` becomes a view of its bucket,
            which saves a copy of every gradient per step; the bucket is then overwritten by
            the next backward, so a ``.grad`` kept across steps changes with it.
        timeout: seconds :meth:`finish` waits for one operation before it prints why and
            ends the job (``group.abort``; a rank that hangs would otherwise hold every
            other rank forever); None: the group's timeout (:func:`moecore.distributed.init`),
            which also bounds every other blocking call, this class's broadcasts included.
        wire_dtype: what an uncompressed bucket crosses the network as: ``"float32"``, or
            ``"bfloat16"`` (half the bytes; like PyTorch's ``bf16_compress_hook``): the
            float32 bucket is rounded to bfloat16, summed in float32 at each step of the
            all-reduce and rounded again, then widened back and averaged. Each element
            of the average then carries a relative error of about ``log2(P) + 1`` bf16
            roundings (2⁻⁸ each). Compressed buckets keep their own format.

    Use::

        dp = DataParallel(model, group)
        loss = loss_fn(dp(x), y); loss.backward(); dp.finish(); opt.step()
    """

    #: The ZeRO stage (:class:`moecore.distributed.zero.ZeRO`); part of what ranks agree on.
    _zero_stage = 0
    #: Buckets never span two layers (see :meth:`_grad_layers`).
    _split_layers = False

    def __init__(
        self,
        model: Any,
        group: Group,
        bucket_mb: float = 25,
        policy: str = "fifo",
        compress: str | TopK | None = None,
        *,
        first_bucket_mb: float = 1,
        partition_mb: float = 4,
        credit_mb: float = 64,
        warmup_steps: int = 0,
        compress_when: str = "auto",
        progress: str = "hooks",
        gradient_as_bucket_view: bool = False,
        timeout: float | None = None,
        wire_dtype: str = "float32",
    ) -> None:
        self.timeout = check_timeout(timeout)
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype!r}")
        self.wire_dtype = wire_dtype
        self.module = model
        self.gradient_as_bucket_view = bool(gradient_as_bucket_view)
        self.group = group
        self.compressor = parse_compress(compress)
        if self.compressor is not None and not self.compressor.exact_k:
            raise ValueError(
                "DataParallel needs TopK(exact_k=True): every rank must send k entries"
            )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("DataParallel: the model has no parameter that requires grad")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        for name, p in named:
            if p.data.dtype != np.float32 or not isinstance(p.data, np.ndarray):
                raise TypeError(
                    f"DataParallel: parameter {name!r} is {p.data.dtype}; only float32 numpy "
                    "parameters are supported"
                )
        # Before any collective over the parameters: mismatched models or settings must not
        # pair up.
        wire = {
            "bucket_mb": bucket_mb,
            "first_bucket_mb": first_bucket_mb,
            "policy": policy,
            "partition_mb": partition_mb,
            "credit_mb": credit_mb,
            "warmup_steps": warmup_steps,
            "compress_when": compress_when,
            "compress": _wire_format(self.compressor),
            "zero": self._zero_stage,
            "wire_dtype": wire_dtype,
        }
        check_ranks_agree(group, "DataParallel", named, wire)
        layers = self._grad_layers(named)
        self.scheduler = Scheduler(
            [GradSpec(n, p.data.size, "float32", layer) for (n, p), layer in zip(named, layers)],
            world=group.size,
            bucket_mb=bucket_mb,
            first_bucket_mb=first_bucket_mb,
            policy=policy,
            partition_mb=partition_mb,
            credit_mb=credit_mb,
            compress_ratio=None if self.compressor is None else self.compressor.ratio,
            warmup_steps=warmup_steps,
            compress_when=compress_when,
            split_layers=self._split_layers,
        )
        self._layout()
        self._wire = self._wire_buffers()
        self._requests: dict[int, Request] = {}
        # Parameters with no gradient this step, sent as zeros: known only at `finish` (the
        # scheduler releases a bucket during backward only once all its gradients are ready).
        self._missing: set[int] = set()
        self._driver = Driver(progress)
        self.last_stats: dict[str, Any] = {}
        self._stats = self._new_stats()
        for p in self.params:
            group.broadcast(p.data, root=0)
        self._hooks: list[Callable[[], None]] = []
        self._sync = True
        if group.size > 1:
            for i, p in enumerate(self.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook_for(i)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _layout(self) -> None:
        self.buckets = self.scheduler.buckets()
        self.buffers = [np.zeros(b.numel, dtype=np.float32) for b in self.buckets]
        # Parameter index -> (bucket, offset, numel).
        self._where: dict[int, tuple[int, int, int]] = {}
        for bi, b in enumerate(self.buckets):
            for g, off, n in b.slices:
                self._where[g] = (bi, off, n)

    @staticmethod
    def _new_stats() -> dict[str, Any]:
        return {
            "launched_in_backward": 0,
            "launched_at_finish": 0,
            "allgather_bytes": 0,
            # Backward held by a wait (the priority policy's credit).
            "backward_wait_seconds": 0.0,
        }

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate ``.grad`` locally (gradient accumulation:
        every micro-batch but the last); the next backward outside sends the sum."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _hook_for(self, index: int) -> Callable[[Any], None]:
        def hook(_tensor: Any) -> None:
            if self._sync:
                self._ready(index)

        return hook

    def _grad_layers(self, named: list[tuple[str, Any]]) -> list[int]:
        """The scheduler's layer of each gradient: its owning module, in registration
        order (ZeRO stage 3: its gather unit)."""
        return _layers([n for n, _ in named])

    def remove_hooks(self) -> None:
        """Detaches from the model (its gradients are no longer communicated) and stops the
        polling thread, if any."""
        self._driver.close()
        for remove in self._hooks:
            remove()
        self._hooks.clear()

    # --- during backward ----------------------------------------------------------------

    def _ready(self, index: int) -> None:
        if not self.scheduler.in_step:
            self.scheduler.begin_step()
        # The gradient is final now (the hook runs after its last accumulation) and stays
        # so until the optimizer: it is read when its bucket goes out (see `_fill`).
        actions = self.scheduler.ready(index)
        self._run(actions, "launched_in_backward")
        if self._driver.mode == "hooks":
            self._driver.poll()

    def _run(self, actions: list[Action], counter: str) -> None:
        for a in actions:
            if a.kind == "wait":
                what = f"DataParallel: operation {a.op} (bucket {a.bucket})"
                limit = None if self.timeout is None else _LIMIT
                t0 = time.perf_counter()
                with self.group.watch(what, self.timeout, limit):
                    self._driver.wait(self._requests.pop(a.op))
                if counter == "launched_in_backward":
                    self._stats["backward_wait_seconds"] += time.perf_counter() - t0
                continue
            self._stats[counter] += 1
            req = self._launch(a)
            self._requests[a.op] = req
            self._driver.add(req)

    def _launch(self, a: Action) -> Request:
        """Starts the collective of launch action ``a``."""
        view = self.buffers[a.bucket][a.offset : a.offset + a.numel]
        if a.transport == "allreduce":
            self._fill(a.bucket, a.offset, a.offset + a.numel)
            if self._wire is None:
                return self.group.iallreduce(view, on_done=self._scaler(view))
            wire = self._wire[a.bucket][a.offset : a.offset + a.numel]
            wire[...] = view  # rounded to the nearest bfloat16 (ties to even)
            return self.group.iallreduce(wire, on_done=self._widener(wire, view))
        # A compressed bucket goes whole, compressed straight from the gradients.
        return self._launch_compressed(a.bucket, view, self._pieces(a.bucket))

    def _grad(self, index: int) -> np.ndarray:
        """Parameter ``index``'s flat gradient this step (zeros if it got none)."""
        if index in self._missing:
            return np.zeros(self.params[index].data.size, dtype=np.float32)
        return np.asarray(self.params[index].grad, dtype=np.float32).reshape(-1)

    def _fill(self, bucket: int, lo: int, hi: int, out: np.ndarray | None = None) -> None:
        """Copies the gradients into elements ``lo:hi`` of the bucket's buffer (or into
        ``out``, which then stands for those elements) just before they are sent (an
        all-reduce works in place)."""
        buf, base = (self.buffers[bucket], 0) if out is None else (out, lo)
        for g, off, n in self.buckets[bucket].slices:
            a, b = max(lo, off), min(hi, off + n)
            if a >= b:
                continue
            dst = buf[a - base : b - base]
            if g in self._missing:
                dst[...] = 0.0
                continue
            src = self._grad(g)[a - off : b - off]
            if src.ctypes.data != dst.ctypes.data:  # else accumulated in the bucket itself
                dst[...] = src

    def _pieces(self, bucket: int) -> list[np.ndarray]:
        """The bucket's gradients in its order, read in place by the compressor."""
        return [self._grad(g) for g, _, _ in self.buckets[bucket].slices]

    def _scaler(self, view: np.ndarray) -> Callable[[], None]:
        inv = np.float32(1.0 / self.group.size)

        def scale() -> None:
            np.multiply(view, inv, out=view)

        return scale

    def _wire_buffers(self) -> list[np.ndarray] | None:
        """The bfloat16 copy each all-reduced bucket crosses the network as (None: the
        float32 bucket itself goes)."""
        if self.wire_dtype == "float32":
            return None
        return [np.empty(buf.size, dtype=WIRE_DTYPES[self.wire_dtype]) for buf in self.buffers]

    def _widener(self, wire: np.ndarray, view: np.ndarray) -> Callable[[], None]:
        inv = np.float32(1.0 / self.group.size)

        def widen() -> None:  # widened and averaged in one pass
            np.multiply(wire, inv, out=view, dtype=np.float32)

        return widen

    def _launch_compressed(
        self, bucket: int, view: np.ndarray, pieces: list[np.ndarray] | None = None
    ) -> Request:
        """Compresses the bucket (``pieces``, its gradients in order, or else ``view``) and
        all-gathers fixed-size slots (8-byte length, payload, padding): one non-blocking
        collective whose size every rank knows in advance. The average lands in ``view``."""
        assert self.compressor is not None
        name = f"bucket{bucket}"
        k = self.compressor.k_next(view.size, name)
        payload: np.ndarray | None
        try:
            if pieces is None:
                payload, _ = self.compressor.compress(view, name=name)
            else:
                payload, _ = self.compressor.compress_pieces(pieces, name=name)
        except NonFiniteGradient:
            # What a dense all-reduce does with a NaN or inf: the average is non-finite on
            # every rank (a trainer then skips the step on all of them, as in one process),
            # instead of this rank alone raising. Its residual keeps its old, finite value.
            self.compressor.skip(view.size, name)
            payload = None
        slot = 8 + _payload_bound(self.compressor, view.size, k)
        length = -1 if payload is None else payload.nbytes
        if length > slot - 8:
            raise RuntimeError(
                f"DataParallel: payload of {length} bytes exceeds its bound {slot - 8}"
            )
        send = np.zeros(slot, dtype=np.uint8)
        send[:8] = np.frombuffer(np.int64(length).tobytes(), dtype=np.uint8)
        if payload is not None:
            send[8 : 8 + length] = payload
        recv = np.empty((self.group.size, slot), dtype=np.uint8)
        self._stats["allgather_bytes"] += max(length, 0) * (self.group.size - 1)
        scale = 1.0 / self.group.size
        compressor = self.compressor

        def combine() -> None:
            lengths = recv[:, :8].copy().view(np.int64).reshape(-1)
            if (lengths < 0).any():  # a rank's gradient was not finite
                view.fill(np.nan)
                return
            parts = [recv[r, 8 : 8 + int(lengths[r])] for r in range(self.group.size)]
            compressor.decompress_sum(parts, out=view, scale=scale, overwrite=True)

        return self.group.iallgather(send, recv, on_done=combine)

    # --- end of backward ----------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Sends what is left, waits for everything, and writes the averaged gradients into
        each parameter's ``.grad``. Returns this step's statistics (operations launched
        during backward and at finish, seconds spent here, seconds backward was held by a
        wait for credit, bytes all-gathered)."""
        if self.group.size == 1:
            self.last_stats = {"finish_seconds": 0.0, **self._new_stats()}
            return self.last_stats
        t0 = time.perf_counter()
        self._send_rest()
        for i, p in enumerate(self.params):
            b, off, n = self._where[i]
            avg = self.buffers[b][off : off + n].reshape(p.data.shape)
            if self.gradient_as_bucket_view:
                p.grad = avg
            elif p.grad is None:
                p.grad = avg.copy()
            else:
                p.grad[...] = avg
        if self.scheduler.step == 1 and not self.scheduler.rebuilt:
            self._rebuild()
        self._stats["finish_seconds"] = time.perf_counter() - t0
        self.last_stats, self._stats = self._stats, self._new_stats()
        return self.last_stats

    def _send_rest(self) -> None:
        """Launches what this backward left to the end and waits for every operation."""
        if not self.scheduler.in_step:
            self.scheduler.begin_step()
        # Gradients that never became ready go as zeros (`_fill`, `_grad`).
        self._missing = set(self.scheduler.unready())
        try:
            self._run(self.scheduler.finish(), "launched_at_finish")
        finally:
            self._missing = set()
        self._driver.clear()
        if self._requests:
            raise RuntimeError(
                f"{type(self).__name__}: operations {sorted(self._requests)} never waited for"
            )

    def _rebuild(self) -> None:
        """DDP's one-time rebuild: buckets from rank 0's observed ready order."""
        local = self.scheduler.observed_order()
        order = np.asarray(local if local is not None else [], dtype=np.int64)
        if order.size != len(self.params):
            raise RuntimeError("DataParallel: no complete ready order after the first step")
        self.group.broadcast(order, root=0)
        old = self.buckets
        residuals = self._residuals_by_param(old)
        self.scheduler.rebuild(order.tolist())
        self._layout()
        self._wire = self._wire_buffers()
        self._load_residuals(residuals)

    def _residuals_by_param(self, buckets: list[Any]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        if self.compressor is None:
            return out
        for bi, b in enumerate(buckets):
            r = self.compressor.residual(f"bucket{bi}")
            if r is None:
                continue
            for g, off, n in b.slices:
                out[g] = r.reshape(-1)[off : off + n].copy()
        return out

    def _load_residuals(self, residuals: dict[int, np.ndarray]) -> None:
        """Carries error-feedback residuals over a rebuild (bucket names change meaning)."""
        if self.compressor is None or not residuals:
            return
        if self.compressor.momentum is not None:
            # Momentum state (u, v) cannot be rebuilt from the residual view alone.
            self.compressor.clear()
            return
        state = self.compressor.state_dict()
        calls = max((s["calls"] for s in state["slots"]), default=0)
        slots = []
        for bi, b in enumerate(self.buckets):
            r = np.zeros(b.numel, dtype=np.float32)
            for g, off, n in b.slices:
                if g in residuals:
                    r[off : off + n] = residuals[g]
            slots.append({"name": f"bucket{bi}", "shape": [b.numel], "calls": calls, "residual": r})
        state["slots"] = slots
        self.compressor.load_state_dict(state)
