"""``Module``: the base of layers and models, with PyTorch's semantics."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from moecore.autograd.tensor import Tensor
from moecore.backend import to_device
from moecore.nn.parameter import Parameter


class Module:
    """Base class of every layer. Assigning a :class:`Parameter` or a ``Module`` to an
    attribute registers it; ``state_dict`` names everything with dotted paths.

    Examples:
        >>> class Affine(Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.scale = Parameter(np.ones(3, np.float32))
        ...     def forward(self, x):
        ...         return x * self.scale
        >>> list(Affine().state_dict())
        ['scale']
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration --------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() first")
        buffers = self.__dict__["_buffers"]
        if name in buffers and not isinstance(value, Parameter | Module):
            # Assigning to a buffer (``self.bias += step`` too) keeps it a buffer, as in
            # PyTorch: otherwise it would silently drop out of ``state_dict``.
            buffers[name] = value
            return
        for table in ("_parameters", "_buffers", "_modules"):
            self.__dict__[table].pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)
            return
        self.__dict__.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        for table in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(table)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for table in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__[table]:
                del self.__dict__[table][name]
                return
        object.__delattr__(self, name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Registers ``param`` under ``name`` (None registers an absent optional one)."""
        if param is None:
            self._parameters[name] = None
        else:
            setattr(self, name, param)

    def register_buffer(self, name: str, value: Any, persistent: bool = True) -> None:
        """Registers a non-learnable array (part of ``state_dict`` when persistent)."""
        self.__dict__.pop(name, None)
        self._buffers[name] = value
        if not persistent:
            self.__dict__.setdefault("_non_persistent", set()).add(name)

    # -- traversal -----------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and every sub-module (depth first, in registration order, as
        PyTorch), with dotted names, each once."""
        seen: set[int] = set()

        def walk(name: str, module: Module) -> Iterator[tuple[str, Module]]:
            if id(module) in seen:
                return
            seen.add(id(module))
            yield name, module
            for child_name, child in module._modules.items():
                if child is not None:
                    yield from walk(f"{name}.{child_name}" if name else child_name, child)

        yield from walk(prefix, self)

    def modules(self) -> Iterator[Module]:
        """This module and every sub-module."""
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator[Module]:
        """The direct sub-modules."""
        yield from (m for m in self._modules.values() if m is not None)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """Every parameter with its dotted name; a shared parameter appears once."""
        seen: set[int] = set()
        modules = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for module_name, module in modules:
            for name, p in module._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{module_name}.{name}" if module_name else name), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """Every parameter (each once)."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """Every buffer with its dotted name."""
        for module_name, module in self.named_modules(prefix):
            for name, b in module._buffers.items():
                if b is not None:
                    yield (f"{module_name}.{name}" if module_name else name), b

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> OrderedDict[str, Any]:
        """Parameters and persistent buffers as ``{dotted name: array}`` (the arrays
        themselves, not copies; tied parameters appear under their first name only)."""
        out: OrderedDict[str, Any] = OrderedDict()
        for name, p in self.named_parameters():
            out[name] = p.data
        for module_name, module in self.named_modules():
            skip = module.__dict__.get("_non_persistent", set())
            for name, b in module._buffers.items():
                if b is not None and name not in skip:
                    key = f"{module_name}.{name}" if module_name else name
                    out[key] = b.data if isinstance(b, Tensor) else b
        return out

    def load_state_dict(
        self, state: Mapping[str, Any], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Copies ``state`` into this module's parameters and buffers, in place.

        With ``strict``, missing and unexpected keys raise a ``KeyError`` listing all of
        them; a shape mismatch always raises ``ValueError``. Returns (missing, unexpected).
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        problems = []
        for key, target in own.items():
            if key not in state:
                continue
            value = state[key]
            value = value.data if isinstance(value, Tensor) else value
            if tuple(value.shape) != tuple(target.shape):
                problems.append(f"{key}: saved {tuple(value.shape)}, model {tuple(target.shape)}")
                continue
            target[...] = to_device(value, "cpu") if isinstance(target, np.ndarray) else value
        if problems:
            raise ValueError("load_state_dict: shape mismatch for " + "; ".join(problems))
        return missing, unexpected

    # -- modes and conversion ------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Sets training mode (dropout active, routing statistics updated) recursively."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        """Sets evaluation mode recursively."""
        return self.train(False)

    def to(self, device: str | None = None, dtype: Any = None) -> Module:
        """Moves and/or casts every parameter and buffer in place (Parameter objects keep
        their identity, so optimizers built earlier stay valid)."""
        for p in self.parameters():
            data = p.data
            if dtype is not None and data.dtype.kind == "f":
                data = data.astype(dtype, copy=False)
            if device is not None:
                data = to_device(data, device)
            p.data = data
            if p.grad is not None:
                p.grad = None
        for m in self.modules():
            for name, b in list(m._buffers.items()):
                if b is None:
                    continue
                if dtype is not None and b.dtype.kind == "f":
                    b = b.astype(dtype, copy=False)
                if device is not None:
                    b = to_device(b, device)
                m._buffers[name] = b
        return self

    def apply(self, fn: Callable[[Module], None]) -> Module:
        """Calls ``fn`` on every sub-module (children first) and on self."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of every parameter."""
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    # -- calling and printing ------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The computation; subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def extra_repr(self) -> str:
        """Extra text for ``repr`` (layer sizes); subclasses override it."""
        return ""

    def __repr__(self) -> str:
        lines = [
            f"  ({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()
        ]
        extra = self.extra_repr()
        if not lines:
            return f"{type(self).__name__}({extra})"
        head = f"{type(self).__name__}({extra}" if extra else f"{type(self).__name__}("
        return head + "\n" + "\n".join(lines) + "\n)"
