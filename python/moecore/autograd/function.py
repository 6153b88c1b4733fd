"""``Function``: a differentiable operation as a forward/backward pair over raw arrays.

An op is written once, as two static methods over numpy (or CuPy) arrays::

    class Mul(Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return a * b

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            return grad * b, grad * a

and called through ``Mul.apply(x, y)`` with Tensors (or plain values, passed through as
constants). ``backward`` returns one gradient per positional argument of ``forward`` (None
for constants and inputs that need none); ``ctx.needs_input_grad`` says which are wanted.
A ``forward`` that returns a tuple makes several output Tensors; its ``backward`` then gets
one gradient per output, None for an output no gradient reached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moecore.autograd.grad_mode import is_grad_enabled


class Context:
    """Per-call state of a Function: its inputs, what forward saved, and any attributes the
    function sets on it. Saved arrays are dropped as soon as backward has used them."""

    def __init__(self, fn: type[Function], parents: tuple[Tensor | None, ...]) -> None:
        self.fn = fn
        # One entry per positional argument of forward: the Tensor, or None for a constant.
        self.parents = parents
        self.needs_input_grad = tuple(p is not None and p.requires_grad for p in parents)
        self.n_outputs = 1
        self.non_differentiable: frozenset[int] = frozenset()
        self._saved: tuple[Any, ...] = ()
        self.released = False

    if TYPE_CHECKING:
        # Each Function keeps its own per-call state on ctx (``ctx.shape``, ``ctx.axes``…).
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    def save_for_backward(self, *arrays: Any) -> None:
        """Keeps arrays for backward (freed right after backward runs)."""
        self._saved = arrays

    @property
    def saved_tensors(self) -> tuple[Any, ...]:
        """What forward saved; raises if backward already ran and freed it."""
        if self._saved is None:
            raise RuntimeError(
                f"{self.fn.__name__}: saved arrays were freed by an earlier backward; "
                "call backward(retain_graph=True) to backward through the graph twice"
            )
        return self._saved

    def mark_non_differentiable(self, *indices: int) -> None:
        """Declares outputs (by index) that carry no gradient (e.g. integer indices)."""
        self.non_differentiable = frozenset(indices)

    def release(self) -> None:
        """Frees what forward saved and the links to the inputs, so a finished graph holds
        no memory even while its output Tensor is still referenced."""
        self._saved = None  # type: ignore[assignment]
        self.parents = tuple(None for _ in self.parents)
        self.released = True
        for name in [k for k in vars(self) if k not in _KEEP_ON_RELEASE]:
            delattr(self, name)


_KEEP_ON_RELEASE = frozenset(
    {"fn", "parents", "needs_input_grad", "n_outputs", "non_differentiable", "_saved", "released"}
)


class Function:
    """Base class of differentiable operations; subclasses define ``forward``/``backward``."""

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> Any:
        """Computes the output array(s) from input arrays; saves what backward needs."""
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, *grads: Any) -> Any:
        """Returns the gradient w.r.t. each positional input of forward (None if not needed)."""
        raise NotImplementedError

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        """Runs forward on the arrays of ``args`` and records the call on the tape."""
        parents = tuple(a if isinstance(a, Tensor) else None for a in args)
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        devices = {p.device for p in parents if p is not None}
        if len(devices) > 1:
            raise ValueError(f"{cls.__name__}: inputs are on different devices {sorted(devices)}")
        ctx = Context(cls, parents)
        out = cls.forward(ctx, *arrays, **kwargs)
        record = is_grad_enabled() and any(ctx.needs_input_grad)
        if isinstance(out, tuple):
            ctx.n_outputs = len(out)
            results = tuple(
                _wrap(o, ctx, i, record and i not in ctx.non_differentiable)
                for i, o in enumerate(out)
            )
            return results
        return _wrap(out, ctx, 0, record)


def _wrap(array: Any, ctx: Context, index: int, record: bool) -> Tensor:
    t = Tensor._from_array(array, requires_grad=record)
    if record:
        t._ctx = ctx
        t._out_index = index
    return t


def array_of(x: Any) -> Any:
    """The array a Tensor holds; anything else as it is (how ``apply`` reads its arguments)."""
    return x.data if isinstance(x, Tensor) else x


# Last, not at the top: tensor.py builds Tensor's operators from the Functions defined above
# (autograd/primitives/), so it can only run once this module's classes exist. The package's
# __init__ imports this module before tensor.py, so this line is what loads tensor.py.
from moecore.autograd.tensor import Tensor  # noqa: E402
