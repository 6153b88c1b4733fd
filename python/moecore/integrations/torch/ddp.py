"""A ``torch.distributed`` DDP communication hook that sends each gradient bucket as
moecore's top-k payload (error feedback, DGC warm-up) over an all-gather."""

# No ``from __future__ import annotations``: DDP checks the hook's annotations at run time
# (``bucket: dist.GradBucket``, returning ``torch.futures.Future[torch.Tensor]``).

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from moecore.compress import TopK, decompress_sum

__all__ = ["TopKHookState", "topk_hook"]


@dataclass
class TopKHookState:
    """What :func:`topk_hook` keeps between steps.

    Args:
        compressor: the :class:`moecore.compress.TopK` compressing every bucket; it keeps one
            error-feedback residual per bucket (named ``"bucket<index>"``) and runs its own
            warm-up (``warmup_steps``: DGC's density stages) from the first compressed step.
        process_group: the group to average over (None: the default group).
        dense_steps: steps averaged by a plain all-reduce before compression starts (at least
            1: DDP rebuilds its buckets after the first step, and a bucket's residual must
            keep its size).

    Attributes:
        step: steps finished (counted at each step's last bucket).
        bytes_sent: bytes this rank contributed to the collectives so far: ``4·n`` per dense
            bucket of ``n`` float32 gradients, the (padded) payload plus its 8-byte length per
            compressed one.
    """

    compressor: TopK
    process_group: Any = None
    dense_steps: int = 1
    step: int = 0
    bytes_sent: int = field(default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.compressor, TopK):
            raise TypeError(
                f"compressor: expected a moecore.compress.TopK, got {type(self.compressor).__name__}"
            )
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int):
            raise TypeError(f"dense_steps: expected an int >= 1, got {self.dense_steps!r}")
        if self.dense_steps < 1:
            raise ValueError(
                f"dense_steps: expected >= 1 (DDP rebuilds its buckets after the first step), "
                f"got {self.dense_steps}"
            )


def _done(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def topk_hook(state: TopKHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's average over the group, each rank sending only its
    top-k (plus error feedback) after ``state.dense_steps`` dense steps.

    Each rank compresses its local bucket gradient with ``state.compressor`` (read in place
    through DLPack), all-gathers the payloads (their lengths first, then the payloads padded
    to the longest) and decodes their sum times ``1/world`` straight into the bucket. Every
    rank decodes the same payloads, so every rank ends with the same gradient.

    Register with ``ddp_model.register_comm_hook(TopKHookState(TopK(0.01)), topk_hook)``.
    Gloo (CPU) is tested; on NCCL the payloads travel as CUDA tensors and are decoded on the
    host (untested here: no GPU).
    """
    buf = bucket.buffer()
    group = state.process_group
    world = dist.get_world_size(group)
    if state.step < state.dense_steps:
        state.bytes_sent += buf.numel() * buf.element_size()
        if bucket.is_last():
            state.step += 1
        buf.div_(world)
        work = dist.all_reduce(buf, group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])
    payload, _ = state.compressor.compress(buf, name=f"bucket{bucket.index()}")
    length = torch.tensor([payload.size], dtype=torch.int64, device=buf.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(n.item()) for n in lengths]
    send = torch.zeros(max(sizes), dtype=torch.uint8, device=buf.device)
    send[: payload.size] = torch.from_numpy(payload).to(buf.device)
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=group)
    state.bytes_sent += send.numel() + length.numel() * 8
    payloads = [r[:n].cpu() for r, n in zip(received, sizes)]
    decompress_sum(payloads, buf, scale=1.0 / world, overwrite=True)
    if bucket.is_last():
        state.step += 1
    return _done(buf)
