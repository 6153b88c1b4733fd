"""The backward pass: a reverse topological walk over the recorded Functions.

Gradients are accumulated per (Function call, output); a leaf's gradient is finished — its
hooks fire and it lands in ``.grad`` — as soon as the last Function that consumed it has run
its backward, not at the end of the pass. Data parallelism relies on that to start
communicating a layer's gradients while the layers below are still in backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from moecore.backend import is_bf16, widen_bf16

if TYPE_CHECKING:
    from moecore.autograd.function import Context
    from moecore.autograd.tensor import Tensor


def _graph(root_ctx: Context) -> tuple[list[Context], dict[int, int]]:
    """Function calls reachable from ``root_ctx`` in topological order (inputs first), and
    for each leaf (by id) the number of calls that consume it."""
    order: list[Context] = []
    leaf_uses: dict[int, int] = {}
    visited: set[int] = set()
    stack: list[tuple[Context, bool]] = [(root_ctx, False)]
    while stack:
        ctx, expanded = stack.pop()
        if expanded:
            order.append(ctx)
            continue
        if id(ctx) in visited:
            continue
        if ctx.released:
            raise RuntimeError(
                f"{ctx.fn.__name__}: trying to backward through the graph a second time; "
                "its saved arrays were freed (use backward(retain_graph=True) the first time)"
            )
        visited.add(id(ctx))
        stack.append((ctx, True))
        for parent in ctx.parents:
            if parent is None or not parent.requires_grad:
                continue
            if parent._ctx is None:
                leaf_uses[id(parent)] = leaf_uses.get(id(parent), 0) + 1
            elif id(parent._ctx) not in visited:
                stack.append((parent._ctx, False))
    return order, leaf_uses


def _conform(grad: Any, target: Tensor) -> Any:
    """The gradient of a bf16 array (or a bf16 gradient of a float32 array) in the format it
    is kept in: a leaf's (a parameter's compute copy) in float32, as the float32 master
    accumulates it; an intermediate's in bf16, its stored format. Anything else as given."""
    want = target.data.dtype
    if is_bf16(want) and target._ctx is None:
        want = np.dtype(np.float32)
    if grad.dtype == want or not (is_bf16(want) or is_bf16(grad.dtype)):
        return grad
    if is_bf16(grad.dtype) and want == np.float32:
        return widen_bf16(grad)
    return grad.astype(want)


def _check(grad: Any, target: Tensor, ctx: Context, position: int) -> None:
    low = is_bf16(target.data.dtype) and (is_bf16(grad.dtype) or grad.dtype == np.float32)
    if grad.shape != target.data.shape or (grad.dtype != target.data.dtype and not low):
        raise RuntimeError(
            f"{ctx.fn.__name__}.backward returned a gradient of shape {tuple(grad.shape)} "
            f"and dtype {grad.dtype} for input {position}, whose shape is "
            f"{tuple(target.data.shape)} and dtype {target.data.dtype}"
        )


def _add(store: dict[Any, Any], key: Any, grad: Any) -> None:
    previous = store.get(key)
    # Never add in place here: a Function may hand the same array to several inputs.
    store[key] = grad if previous is None else previous + grad


def _finish_leaf(leaf: Tensor, grad: Any, handed_out: set[int]) -> None:
    for hook in leaf._hooks:
        replaced = hook(grad)
        if replaced is not None:
            grad = replaced
    if leaf.grad is None:
        # .grad is owned by the leaf (optimizers and clipping write it in place), so it must
        # not alias a view or an array already given to another leaf.
        # A base that is not an array is the owner of fresh memory (rust-numpy's
        # PySliceContainer for the arrays the Rust kernels return), not another array this
        # one is a view of: such results need no copy either.
        base = getattr(grad, "base", None)
        fresh = base is None or (not isinstance(base, type(grad)) and grad.flags.writeable)
        owned = fresh and id(grad) not in handed_out
        leaf.grad = grad if owned else grad.copy()
        handed_out.add(id(leaf.grad))
    else:
        leaf.grad += grad
    for hook in leaf._post_hooks:
        hook(leaf)


def run_backward(root: Tensor, grad: Any, retain_graph: bool = False) -> None:
    """Backpropagates ``grad`` (the gradient of some scalar w.r.t. ``root``) to every leaf
    that requires a gradient, accumulating into their ``.grad``."""
    handed_out: set[int] = set()
    if root._ctx is None:
        _finish_leaf(root, grad, handed_out)
        return
    order, leaf_uses = _graph(root._ctx)
    grads: dict[tuple[int, int], Any] = {(id(root._ctx), root._out_index): grad}
    leaf_grads: dict[int, Any] = {}
    for ctx in reversed(order):
        out_grads = [grads.pop((id(ctx), i), None) for i in range(ctx.n_outputs)]
        hooks = getattr(ctx, "_output_hooks", None)
        if hooks:
            for index, fns in hooks.items():
                for fn in fns:
                    if out_grads[index] is not None:
                        replaced = fn(out_grads[index])
                        if replaced is not None:
                            out_grads[index] = replaced
        if any(g is not None for g in out_grads):
            result = ctx.fn.backward(ctx, *out_grads)
            if not isinstance(result, tuple):
                result = (result,)
            if len(result) != len(ctx.parents):
                raise RuntimeError(
                    f"{ctx.fn.__name__}.backward returned {len(result)} gradients for "
                    f"{len(ctx.parents)} inputs"
                )
        else:
            result = (None,) * len(ctx.parents)
        for position, (parent, g) in enumerate(zip(ctx.parents, result)):
            if parent is None or not parent.requires_grad:
                continue
            if g is not None:
                g = _conform(g, parent)
                _check(g, parent, ctx, position)
                if parent._ctx is not None:
                    _add(grads, (id(parent._ctx), parent._out_index), g)
                else:
                    _add(leaf_grads, id(parent), g)
            if parent._ctx is None:
                leaf_uses[id(parent)] -= 1
                if leaf_uses[id(parent)] == 0:
                    done = leaf_grads.pop(id(parent), None)
                    if done is not None:
                        _finish_leaf(parent, done, handed_out)
        if not retain_graph:
            ctx.release()
