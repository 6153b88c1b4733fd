"""The MoE kernel family's interface, :class:`MoEKernels`, and the choice of its
implementation for given arrays.

Three implementations, each a module with these functions (same arguments and semantics; the
docstrings of :mod:`moecore.moe_kernels` are the reference):

- :mod:`moecore.moe_kernels` — the Rust kernels of ``moecore._core`` (float32 numpy);
- :mod:`moecore.kernels.cuda.moe_kernels` — the CUDA kernels of ``cuda/moe.cu`` and CuPy's
  cuBLAS matmuls (float32 CuPy);
- :mod:`moecore.kernels.generic` — array-module operations (float64, numpy or CuPy; also
  arrays of mixed dtypes or devices).

``tests/test_kernels_dispatch.py`` checks that each has every method of :class:`MoEKernels`
with the same parameters.
"""

from __future__ import annotations

from typing import Any, Protocol

from moecore.backend import is_bf16
from moecore.kernels.registry import select_for


class MoEKernels(Protocol):
    """What ``ops/moe.py`` calls, in the order an MoE layer runs them."""

    def router_logits(self, x: Any, router_w: Any) -> Any:
        """``x @ router_w.T``: ``[T, d]``, ``[E, d]`` → ``[T, E]``."""
        ...

    def route(
        self,
        logits: Any,
        k: int,
        score: str = "softmax",
        bias: Any = None,
        n_groups: int | None = None,
        topk_groups: int | None = None,
        normalize: bool = True,
    ) -> tuple[Any, Any, Any]:
        """``(expert_idx, weights, probs)`` of each token's top-``k`` experts."""
        ...

    def permute(
        self,
        x: Any,
        expert_idx: Any,
        n_experts: int,
        capacity: int | None = None,
        weights: Any = None,
        pad_to: int = 1,
    ) -> tuple[Any, Any, Any]:
        """``(x_sorted, order, counts)``: token rows in expert-contiguous order."""
        ...

    def grouped_matmul(self, x_sorted: Any, counts: Any, w: Any) -> Any:
        """Each expert's block of rows times that expert's matrix."""
        ...

    def gelu_ffn(self, x_sorted: Any, counts: Any, w1: Any, w2: Any) -> tuple[Any, Any, Any]:
        """``(h, a, y_sorted)`` of the tanh-GELU expert FFN."""
        ...

    def unpermute(
        self,
        y_sorted: Any,
        order: Any,
        weights: Any = None,
        n_tokens: int | None = None,
        k: int | None = None,
    ) -> Any:
        """Each token's rows summed back into token order, weighted."""
        ...

    def unpermute_backward(
        self, dy: Any, y_sorted: Any, order: Any, weights: Any
    ) -> tuple[Any, Any]:
        """``(d_y_sorted, d_weights)``."""
        ...

    def gelu_ffn_backward(
        self, x_sorted: Any, counts: Any, w1: Any, w2: Any, h: Any, a: Any, d_y_sorted: Any
    ) -> tuple[Any, Any, Any]:
        """``(d_x_sorted, d_w1, d_w2)`` of :meth:`gelu_ffn`."""
        ...

    def grouped_matmul_dx(self, dy: Any, counts: Any, w: Any) -> Any:
        """Gradient of :meth:`grouped_matmul` with respect to ``x_sorted``."""
        ...

    def grouped_matmul_dw(self, x_sorted: Any, dy: Any, counts: Any) -> Any:
        """Gradient of :meth:`grouped_matmul` with respect to ``w``."""
        ...

    def permute_backward(self, dx_sorted: Any, order: Any, n_tokens: int, k: int) -> Any:
        """Gradient of :meth:`permute` with respect to ``x``."""
        ...

    def route_backward(
        self,
        d_weights: Any,
        expert_idx: Any,
        probs: Any,
        score: str = "softmax",
        normalize: bool = True,
    ) -> Any:
        """Gradient of :meth:`route`'s weights with respect to the logits."""
        ...

    def router_backward(self, d_logits: Any, x: Any, router_w: Any, d_x: Any) -> Any:
        """Adds ``d_logits @ router_w`` to ``d_x`` in place; returns ``d_logits.T @ x``."""
        ...


def moe_kernels_for(*arrays: Any) -> MoEKernels:
    """The MoE kernels for these arrays: Rust for float32 numpy, CUDA for float32 CuPy, the
    array-module ones for float64 or mixed arrays (see :mod:`moecore.kernels.registry`)."""
    # bf16 rows (x, router_w, w1, w2…) choose with the experts' weights alone: the router
    # stays float32 in a low-precision run (the bf16 family runs it in float32).
    chosen = (arrays[0], *arrays[2:]) if is_bf16(arrays[0].dtype) else arrays
    impl: MoEKernels = select_for("moe", *chosen)
    return impl
