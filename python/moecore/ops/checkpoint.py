"""Activation checkpointing: keep only a block's inputs; recompute it during backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moecore.autograd.function import Context, Function
from moecore.autograd.grad_mode import enable_grad, no_grad
from moecore.autograd.random import generator
from moecore.autograd.tensor import Tensor


class Checkpoint(Function):
    @staticmethod
    def forward(ctx: Context, *args: Any, fn: Callable[..., Tensor], device: str) -> Any:
        bit_generator = generator(device).bit_generator
        ctx.rng_state = bit_generator.state  # dropout inside must draw the same masks again
        ctx.args, ctx.fn_, ctx.device = args, fn, device
        with no_grad():
            out = fn(*[Tensor(a) if _is_array(a) else a for a in args])
        if not isinstance(out, Tensor):
            raise TypeError("checkpoint: fn must return a single Tensor")
        return out.data

    @staticmethod
    def backward(ctx: Context, g: Any) -> Any:
        bit_generator = generator(ctx.device).bit_generator
        current = bit_generator.state
        bit_generator.state = ctx.rng_state
        try:
            inputs = [
                Tensor(a, requires_grad=need) if _is_array(a) else a
                for a, need in zip(ctx.args, ctx.needs_input_grad)
            ]
            with enable_grad():
                out = ctx.fn_(*inputs)
            if out.requires_grad:
                # Parameters used inside fn are leaves of this inner graph: they receive their
                # gradients (and fire their hooks) here.
                out.backward(g)
        finally:
            bit_generator.state = current
        return tuple(
            (x.grad if isinstance(x, Tensor) and need else None)
            for x, need in zip(inputs, ctx.needs_input_grad)
        )


def _is_array(a: Any) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def checkpoint(fn: Callable[..., Tensor], *inputs: Any) -> Tensor:
    """Runs ``fn(*inputs)`` without keeping its intermediate activations, and runs it again
    in backward to get the gradients: memory for compute. Random ops inside (dropout) see
    the same random numbers both times."""
    devices = [t.device for t in inputs if isinstance(t, Tensor)]
    return Checkpoint.apply(*inputs, fn=fn, device=devices[0] if devices else "cpu")
