"""``gradcheck``: compares backward with central finite differences (as PyTorch's does)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moecore.autograd.grad_mode import no_grad
from moecore.autograd.tensor import Tensor
from moecore.errors import GradcheckError


def _outputs(fn: Callable[..., Any], inputs: Sequence[Tensor]) -> list[Tensor]:
    out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple | list) else [out]
    return [o for o in outs if isinstance(o, Tensor) and o.dtype.kind == "f"]


def _to_numpy(a: Any) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


def gradcheck(
    fn: Callable[..., Any],
    inputs: Sequence[Tensor],
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    seed: int = 0,
    raise_exception: bool = True,
) -> bool:
    """Checks the gradients of ``fn`` w.r.t. every input that requires grad.

    The outputs of ``fn`` are reduced to the scalar ``L = sum_i <out_i, r_i>`` with fixed
    random ``r_i``; ``dL/dx`` from ``backward`` is compared with central differences
    ``(L(x + eps) - L(x - eps)) / 2 eps`` element by element. Use float64 inputs.

    Returns True when they agree within ``atol + rtol * |numeric|``; otherwise raises
    :class:`GradcheckError` naming the input and the worst element (or returns False when
    ``raise_exception`` is False).
    """
    checked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    for t in checked:
        if t.dtype != np.float64:
            raise ValueError(f"gradcheck needs float64 inputs for accuracy, got {t.dtype}")
    rng = np.random.default_rng(seed)
    outs = _outputs(fn, inputs)
    if not outs:
        raise ValueError("gradcheck: fn returned no floating-point tensor")
    projections = [rng.standard_normal(o.shape) for o in outs]

    def loss_value() -> float:
        with no_grad():
            return float(
                sum(
                    np.sum(_to_numpy(o.data) * r) for o, r in zip(_outputs(fn, inputs), projections)
                )
            )

    for t in checked:
        t.grad = None
    total = None
    for o, r in zip(outs, projections):
        if not o.requires_grad:
            continue
        term = (o * Tensor(r.astype(o.dtype))).sum()
        total = term if total is None else total + term
    if total is not None:
        total.backward()

    for position, t in enumerate(inputs):
        if not any(t is c for c in checked):
            continue
        analytic = np.zeros(t.shape) if t.grad is None else _to_numpy(t.grad).astype(np.float64)
        numeric = np.zeros(t.shape)
        flat = t.data.reshape(-1)
        for i in range(flat.size):
            original = flat[i].item()
            flat[i] = original + eps
            plus = loss_value()
            flat[i] = original - eps
            minus = loss_value()
            flat[i] = original
            numeric.reshape(-1)[i] = (plus - minus) / (2 * eps)
        error = np.abs(analytic - numeric)
        bound = atol + rtol * np.abs(numeric)
        if np.any(error > bound):
            worst = np.unravel_index(np.argmax(error - bound), error.shape)
            message = (
                f"gradcheck failed for input {position} (shape {t.shape}) at index "
                f"{tuple(int(i) for i in worst)}: analytic {analytic[worst]:.8g}, numeric "
                f"{numeric[worst]:.8g}; max abs error {error.max():.3g}"
            )
            if raise_exception:
                raise GradcheckError(message)
            return False
    return True
