"""``Tensor``'s operators and methods: written in its class body (not attached at import),
each forward against numpy and each backward against finite differences (float64), and
visible to a type checker."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import numpy as np
import pytest

import moecore as mc
from moecore.autograd import Tensor, gradcheck

OPERATORS = [
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__neg__", "__pow__", "__matmul__", "__getitem__", "exp", "log", "tanh",
    "sigmoid", "relu", "sum", "mean", "max", "reshape", "view", "transpose", "permute",
    "matmul", "T",
]  # fmt: skip

rng = np.random.default_rng(25)


def t64(*shape: int, positive: bool = False) -> Tensor:
    a = rng.standard_normal(shape)
    return Tensor(np.abs(a) + 0.5 if positive else a, requires_grad=True)


@pytest.mark.parametrize("name", OPERATORS)
def test_each_operator_is_written_in_the_class_body(name: str) -> None:
    member = Tensor.__dict__[name]
    fn = member.fget if isinstance(member, property) else member
    assert fn.__module__ == "moecore.autograd.tensor"
    assert fn.__doc__


def test_nothing_patches_tensor_at_import() -> None:
    import moecore.ops

    assert not hasattr(moecore.ops, "tensor_methods")
    assert importlib.util.find_spec("moecore.ops.tensor_methods") is None


C = rng.standard_normal((3, 4))  # a constant operand (array)
IDX = np.array([2, 0, 2])

# (expression, its numpy reference, input shapes, inputs positive?)
CASES = [
    (lambda a: 2.0 + a, lambda a: 2.0 + a, [(3, 4)], False),
    (lambda a: a + C, lambda a: a + C, [(4,)], False),
    # numpy's operators take an array on the left first, so call the reflected ones directly
    (lambda a: a.__radd__(C), lambda a: C + a, [(4,)], False),
    (lambda a: a.__rsub__(C), lambda a: C - a, [(3, 1)], False),
    (lambda a: 1.5 - a, lambda a: 1.5 - a, [(3, 4)], False),
    (lambda a: a - C, lambda a: a - C, [(3, 4)], False),
    (lambda a: a.__rmul__(C), lambda a: C * a, [(3, 1)], False),
    (lambda a: 3.0 * a, lambda a: 3.0 * a, [(5,)], False),
    (lambda a: a.__rtruediv__(C), lambda a: C / a, [(3, 4)], True),
    (lambda a: 2.0 / a, lambda a: 2.0 / a, [(3, 4)], True),
    (lambda a: a / 4.0, lambda a: a / 4.0, [(3, 4)], False),
    (lambda a: a**3, lambda a: a**3, [(5,)], False),
    (lambda a: a**-0.5, lambda a: a**-0.5, [(5,)], True),
    (lambda a: a.log(), np.log, [(5,)], True),
    (lambda a, b: a.matmul(b), np.matmul, [(2, 3, 4), (4, 2)], False),
    (lambda a: a.T, lambda a: a.T, [(2, 3, 4)], False),
    (lambda a: a.view(6, 2), lambda a: a.reshape(6, 2), [(3, 4)], False),
    (lambda a: a.reshape((2, -1)), lambda a: a.reshape(2, -1), [(3, 4)], False),
    (lambda a: a.transpose(0, 2), lambda a: a.swapaxes(0, 2), [(2, 3, 4)], False),
    (lambda a: a.permute((1, 2, 0)), lambda a: a.transpose(1, 2, 0), [(2, 3, 4)], False),
    (lambda a: a.sum(), np.sum, [(3, 4)], False),
    (lambda a: a.mean(-1), lambda a: a.mean(-1), [(3, 4)], False),
    (lambda a: a.max(axis=0, keepdims=True), lambda a: a.max(0, keepdims=True), [(3, 4)], False),
    (lambda a: a[mc.tensor(IDX)], lambda a: a[IDX], [(3, 4)], False),
    (lambda a: a[mc.tensor(IDX), 1:3], lambda a: a[IDX, 1:3], [(3, 4)], False),
    (lambda a: a[..., None, 1], lambda a: a[..., None, 1], [(3, 4)], False),
]


@pytest.mark.parametrize(("fn", "ref", "shapes", "positive"), CASES)
def test_operator_forward_matches_numpy_and_backward_finite_differences(
    fn, ref, shapes, positive
) -> None:
    inputs = [t64(*s, positive=positive) for s in shapes]
    np.testing.assert_allclose(fn(*inputs).data, ref(*(x.data for x in inputs)), rtol=1e-12)
    assert gradcheck(fn, inputs)


def test_to_dtype_is_differentiable_and_gradient_comes_back_in_the_input_dtype() -> None:
    x = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    y = x.to(dtype=np.float32)
    assert y.dtype == np.float32
    (y * y).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad, [2.0, -4.0, 6.0])


def test_reflected_operators_keep_the_tensor_dtype_and_record_the_graph() -> None:
    x = Tensor(np.array([1.0, 2.0, 4.0], np.float32), requires_grad=True)
    y = 1.0 - 2.0 / x  # __rtruediv__ then __rsub__
    assert y.dtype == np.float32 and y.requires_grad
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2.0 / x.data**2, rtol=1e-6)


MYPY_SNIPPET = """
    import numpy as np
    from moecore.autograd import Tensor

    t = Tensor(np.ones((2, 2)))
    reveal_type(t + 1)
    reveal_type(1.0 - t)
    reveal_type(2 * t)
    reveal_type(1 / t)
    reveal_type(-t)
    reveal_type(t**2)
    reveal_type(t @ t)
    reveal_type(t[0])
    reveal_type(t.sum(axis=0).exp())
    reveal_type(t.T.reshape(4).view(2, 2).permute(1, 0))
    t + "a"
"""


def test_a_type_checker_sees_the_operators(tmp_path: Path, monkeypatch) -> None:
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install mypy)")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(MYPY_SNIPPET))
    root = Path(mc.__file__).parent.parent
    if root.name not in ("site-packages", "dist-packages"):
        # A source tree on PYTHONPATH: point mypy at it. (An installed moecore is found in
        # site-packages through its py.typed, and mypy refuses site-packages in MYPYPATH.)
        monkeypatch.setenv("MYPYPATH", str(root))
    args = ["--follow-imports=silent", "--ignore-missing-imports", "--no-error-summary"]
    out, err, _ = api.run([*args, "--cache-dir", str(tmp_path / "cache"), str(snippet)])
    lines = out.splitlines()
    revealed = [line for line in lines if "Revealed type" in line]
    assert len(revealed) == 10, out + err
    assert all('"moecore.autograd.tensor.Tensor"' in line for line in revealed), out
    # and it rejects what the operators do not take
    assert any('Unsupported operand types for + ("Tensor" and "str")' in line for line in lines)
