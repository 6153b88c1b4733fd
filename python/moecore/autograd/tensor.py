"""``Tensor``: an array of the backend (numpy or CuPy) with autograd."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from moecore.autograd.engine import run_backward
from moecore.autograd.grad_mode import is_grad_enabled
from moecore.autograd.primitives import shape as _shape_ops
from moecore.autograd.primitives.elementwise import (
    Add,
    Cast,
    Div,
    Exp,
    Log,
    Mul,
    Neg,
    Pow,
    Relu,
    Sigmoid,
    Sub,
    Tanh,
)
from moecore.autograd.primitives.matmul import MatMul
from moecore.autograd.primitives.reduce import Max, Mean, Sum
from moecore.autograd.primitives.shape import ToDevice
from moecore.autograd.random import generator
from moecore.backend import device_of, is_cupy_array, to_device, xp_for, xp_of

if TYPE_CHECKING:
    from moecore.autograd.function import Context

# What arithmetic takes beside a Tensor: a Python number (which keeps the tensor's dtype, as
# numpy's weak scalars do) or an array (a constant). Spelled here, not in the class, where
# ``float`` names a method.
Operand: TypeAlias = "Tensor | float | np.ndarray"
Exponent: TypeAlias = float
Axes: TypeAlias = "int | Sequence[int] | None"


class Tensor:
    """An n-dimensional array on ``"cpu"`` (numpy) or ``"cuda"`` (CuPy) that records the
    differentiable operations applied to it, so ``loss.backward()`` can fill ``.grad``.

    Args:
        data: a numpy or CuPy array (wrapped without a copy), or anything ``numpy.asarray``
            accepts (copied; Python floats become float32).
        requires_grad: whether gradients should be computed for this tensor.

    Examples:
        >>> x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
        >>> (x * x).sum().backward()
        >>> x.grad
        array([[2., 2., 2.],
               [2., 2., 2.]], dtype=float32)
    """

    __slots__ = (
        "__weakref__",
        "_ctx",
        "_hooks",
        "_out_index",
        "_post_hooks",
        "data",
        "grad",
        "requires_grad",
    )

    def __init__(self, data: Any, requires_grad: bool = False) -> None:
        if isinstance(data, Tensor):
            data = data.data
        elif not (isinstance(data, np.ndarray) or is_cupy_array(data)):
            data = _as_array(data, None)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, not {data.dtype}")
        self.data: Any = data
        self.grad: Any = None
        self.requires_grad: bool = bool(requires_grad)
        self._ctx: Context | None = None
        self._out_index = 0
        self._hooks: list[Callable[[Any], Any]] = []
        self._post_hooks: list[Callable[[Tensor], None]] = []

    @classmethod
    def _from_array(cls, data: Any, requires_grad: bool) -> Tensor:
        t = cls.__new__(cls)
        t.data = data
        t.grad = None
        t.requires_grad = requires_grad
        t._ctx = None
        t._out_index = 0
        t._hooks = []
        t._post_hooks = []
        return t

    # -- facts ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The shape, as a tuple."""
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """The element type (a numpy dtype)."""
        return self.data.dtype

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return device_of(self.data)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return int(self.data.ndim)

    @property
    def is_leaf(self) -> bool:
        """True unless this tensor was made by a recorded operation."""
        return self._ctx is None

    def numel(self) -> int:
        """Number of elements."""
        return int(self.data.size)

    def size(self, dim: int | None = None) -> Any:
        """The shape, or its extent along ``dim`` (PyTorch's ``Tensor.size``)."""
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = "" if self.device == "cpu" else ", device='cuda'"
        return f"tensor({np.array2string(np.asarray(self.numpy()), precision=4)}{dev}{grad})"

    # -- conversion ----------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The data as a numpy array (shared, not copied, on CPU; copied from a GPU)."""
        return self.data if self.device == "cpu" else self.data.get()

    def item(self) -> Any:
        """The single value of a one-element tensor, as a Python scalar."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, not shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self) -> Any:
        """The data as nested Python lists."""
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """The same data, cut from the graph (no gradient flows through it)."""
        return Tensor._from_array(self.data, requires_grad=False)

    def to(self, device: str | None = None, dtype: Any = None) -> Tensor:
        """A copy on ``device`` and/or with ``dtype`` (differentiable); ``self`` if unchanged."""
        out = self
        if dtype is not None and np.dtype(dtype) != self.dtype:
            out = Cast.apply(out, np.dtype(dtype))
        if device is not None and device != out.device:
            out = ToDevice.apply(out, device)
        return out

    def float(self) -> Tensor:
        """This tensor as float32."""
        return self.to(dtype=np.float32)

    def double(self) -> Tensor:
        """This tensor as float64."""
        return self.to(dtype=np.float64)

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> Any:
        return self.data.__dlpack_device__()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    # -- arithmetic (autograd/primitives/elementwise.py) --------------------------------
    def __add__(self, other: Operand) -> Tensor:
        """``self + other``, broadcasting."""
        return Add.apply(self, other)

    def __radd__(self, other: Operand) -> Tensor:
        """``other + self``, broadcasting."""
        return Add.apply(self, other)

    def __sub__(self, other: Operand) -> Tensor:
        """``self - other``, broadcasting."""
        return Sub.apply(self, other)

    def __rsub__(self, other: Operand) -> Tensor:
        """``other - self``, broadcasting (recorded as ``-self + other``)."""
        return Add.apply(Neg.apply(self), other)

    def __mul__(self, other: Operand) -> Tensor:
        """``self * other``, broadcasting."""
        return Mul.apply(self, other)

    def __rmul__(self, other: Operand) -> Tensor:
        """``other * self``, broadcasting."""
        return Mul.apply(self, other)

    def __truediv__(self, other: Operand) -> Tensor:
        """``self / other``, broadcasting."""
        return Div.apply(self, other)

    def __rtruediv__(self, other: Operand) -> Tensor:
        """``other / self``, broadcasting (recorded as ``self ** -1 * other``)."""
        return Mul.apply(Pow.apply(self, -1.0), other)

    def __neg__(self) -> Tensor:
        """``-self``."""
        return Neg.apply(self)

    def __pow__(self, exponent: Exponent) -> Tensor:
        """``self ** exponent`` for a constant exponent."""
        return Pow.apply(self, float(exponent))

    def exp(self) -> Tensor:
        """Elementwise ``e ** self``."""
        return Exp.apply(self)

    def log(self) -> Tensor:
        """Elementwise natural logarithm."""
        return Log.apply(self)

    def tanh(self) -> Tensor:
        """Elementwise hyperbolic tangent."""
        return Tanh.apply(self)

    def sigmoid(self) -> Tensor:
        """Elementwise logistic function."""
        return Sigmoid.apply(self)

    def relu(self) -> Tensor:
        """Elementwise ``max(self, 0)``."""
        return Relu.apply(self)

    # -- matrix product (autograd/primitives/matmul.py) ---------------------------------
    def __matmul__(self, other: Tensor | np.ndarray) -> Tensor:
        """``self @ other``: matrix product, leading dimensions broadcast."""
        return MatMul.apply(self, other)

    def matmul(self, other: Tensor | np.ndarray) -> Tensor:
        """``self @ other``: matrix product, leading dimensions broadcast."""
        return MatMul.apply(self, other)

    # -- reductions (autograd/primitives/reduce.py) -------------------------------------
    def sum(self, axis: Axes = None, keepdims: bool = False) -> Tensor:
        """Sum over ``axis`` (all axes by default)."""
        return Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: Axes = None, keepdims: bool = False) -> Tensor:
        """Mean over ``axis`` (all axes by default)."""
        return Mean.apply(self, axis=axis, keepdims=keepdims)

    def max(self, axis: Axes = None, keepdims: bool = False) -> Tensor:
        """Maximum over ``axis`` (all axes by default); ties share the gradient evenly."""
        return Max.apply(self, axis=axis, keepdims=keepdims)

    # -- shape and indexing (autograd/primitives/shape.py) ------------------------------
    def __getitem__(self, index: Any) -> Tensor:
        """``self[index]``, basic or advanced indexing; Tensor indices are used by value."""
        return _shape_ops.getitem(self, index)

    def reshape(self, *shape: int | Sequence[int]) -> Tensor:
        """This tensor with a new shape (one dimension may be -1), as ints or one tuple."""
        return _shape_ops.reshape(self, *shape)

    # PyTorch's name; numpy reshapes into a view whenever the layout allows.
    view = reshape

    def transpose(self, *axes: int | Sequence[int]) -> Tensor:
        """Two axes: swaps them (PyTorch's ``transpose(d0, d1)``); none: reverses all axes;
        otherwise a full permutation."""
        return _shape_ops.transpose(self, *axes)

    def permute(self, *axes: int | Sequence[int]) -> Tensor:
        """Reorders all axes (PyTorch's ``permute``), as ints or one tuple."""
        return _shape_ops.permute(self, *axes)

    @property
    def T(self) -> Tensor:
        """All axes reversed (the transpose of a matrix)."""
        return _shape_ops.transpose(self)

    # -- autograd ------------------------------------------------------------------------
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Computes the gradient of this tensor w.r.t. every leaf that requires one and adds
        it to their ``.grad``. ``grad`` defaults to 1 for a one-element tensor."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        xp = xp_of(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a one-element tensor, not {self.shape}"
                )
            g = xp.ones_like(self.data)
        else:
            g = grad.data if isinstance(grad, Tensor) else grad
            g = xp.array(g, dtype=self.dtype, copy=True)
            if g.shape != self.data.shape:
                raise ValueError(f"grad has shape {g.shape}, expected {self.shape}")
        run_backward(self, g, retain_graph=retain_graph)

    def register_hook(self, hook: Callable[[Any], Any]) -> Callable[[], None]:
        """Calls ``hook(grad)`` when this tensor's gradient is complete; a returned array
        replaces the gradient. Returns a function that removes the hook."""
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that does not require grad")
        if self._ctx is None:
            hooks = self._hooks
        else:
            table = self._ctx.__dict__.setdefault("_output_hooks", {})
            hooks = table.setdefault(self._out_index, [])
        hooks.append(hook)
        return lambda: hooks.remove(hook) if hook in hooks else None

    def register_post_accumulate_grad_hook(self, hook: Callable[[Tensor], None]) -> Callable:
        """For a leaf: calls ``hook(tensor)`` right after its ``.grad`` was updated in a
        backward pass (as soon as no remaining operation can add to it)."""
        if self._ctx is not None:
            raise RuntimeError("post-accumulate hooks can only be registered on leaf tensors")
        self._post_hooks.append(hook)
        return lambda: self._post_hooks.remove(hook) if hook in self._post_hooks else None

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Sets ``requires_grad`` in place (leaves only) and returns self."""
        if self._ctx is not None and not requires_grad:
            raise RuntimeError("requires_grad can only be switched off on leaf tensors")
        if requires_grad and self.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, not {self.dtype}")
        self.requires_grad = requires_grad
        return self

    def zero_(self) -> Tensor:
        """Fills the data with zeros in place (no gradient is recorded)."""
        self.data[...] = 0
        return self


def _as_array(data: Any, dtype: Any, device: str = "cpu") -> Any:
    if isinstance(data, Tensor):
        data = data.data
    if dtype is None and not (isinstance(data, np.ndarray) or is_cupy_array(data)):
        probe = np.asarray(data)
        dtype = np.float32 if probe.dtype.kind == "f" else None
        data = probe
    if device == "cpu" and is_cupy_array(data):
        data = data.get()
    arr = np.asarray(data, dtype=dtype) if device == "cpu" else to_device(np.asarray(data), device)
    if device != "cpu" and dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr


def tensor(
    data: Any, dtype: Any = None, device: str = "cpu", requires_grad: bool = False
) -> Tensor:
    """A new tensor holding a copy of ``data`` (lists, scalars, arrays). Python floats become
    float32 unless ``dtype`` says otherwise; arrays keep their dtype."""
    arr = _as_array(data, dtype, device)
    if arr is data or (isinstance(data, np.ndarray) and np.shares_memory(arr, data)):
        arr = arr.copy()
    return Tensor(arr, requires_grad=requires_grad)


def _shape(shape: Sequence[int] | tuple[Sequence[int]]) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], tuple | list):
        return tuple(int(s) for s in shape[0])
    return tuple(int(s) for s in shape)  # type: ignore[arg-type]


def zeros(
    *shape: Any, dtype: Any = np.float32, device: str = "cpu", requires_grad: bool = False
) -> Tensor:
    """A tensor of zeros."""
    return Tensor(xp_for(device).zeros(_shape(shape), dtype=dtype), requires_grad=requires_grad)


def ones(
    *shape: Any, dtype: Any = np.float32, device: str = "cpu", requires_grad: bool = False
) -> Tensor:
    """A tensor of ones."""
    return Tensor(xp_for(device).ones(_shape(shape), dtype=dtype), requires_grad=requires_grad)


def randn(
    *shape: Any, dtype: Any = np.float32, device: str = "cpu", requires_grad: bool = False
) -> Tensor:
    """A tensor of standard normal samples from the default generator (see ``manual_seed``)."""
    data = generator(device).standard_normal(_shape(shape), dtype=np.dtype(dtype))
    return Tensor(data, requires_grad=requires_grad)


def arange(
    start: float, stop: float | None = None, step: float = 1, dtype: Any = None, device: str = "cpu"
) -> Tensor:
    """Evenly spaced values in [start, stop) (integers stay int64, as in PyTorch)."""
    if stop is None:
        start, stop = 0, start
    return Tensor(xp_for(device).arange(start, stop, step, dtype=dtype))


def from_dlpack(obj: Any) -> Tensor:
    """A tensor sharing memory with any DLPack exporter (PyTorch, JAX, numpy, CuPy)."""
    device_type = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else 1
    if int(device_type) == 1:  # kDLCPU
        return Tensor(np.from_dlpack(obj))
    return Tensor(xp_for("cuda").from_dlpack(obj))


def is_recording(*tensors: Tensor) -> bool:
    """True when an op on these inputs would be recorded for backward."""
    return is_grad_enabled() and any(t.requires_grad for t in tensors)
