"""The runtime faces are meant to be embedded alone: importing one must not load the autograd,
the ops, the layers nor CuPy. Each case runs in a fresh interpreter, since this one has
loaded everything already."""

from __future__ import annotations

import subprocess
import sys

import pytest

FACES = ["pool", "compress", "sparse", "moe_kernels", "comm"]
# What a runtime face must not drag in (module names and their submodules).
HEAVY = ("moecore.autograd", "moecore.ops", "moecore.nn", "moecore.optim", "moecore.train", "cupy")

LOADED = (
    "import sys; "
    f"print(sorted(n for n in sys.modules if n.split('.')[0] == 'cupy' or n.startswith({HEAVY!r})))"
)


def _fresh(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("face", FACES)
def test_a_runtime_face_imports_without_the_autograd(face: str) -> None:
    assert _fresh(f"import moecore.{face}; {LOADED}") == "[]"


def test_touching_a_tensor_name_loads_the_autograd() -> None:
    # The positive control: the check above sees the autograd when it is loaded.
    out = _fresh(f"import moecore; moecore.Tensor; {LOADED}")
    assert "moecore.autograd" in out
    assert "moecore.autograd.primitives.elementwise" in out


def test_the_autograd_alone_has_every_operator() -> None:
    # Operators are Tensor's own methods: no need to import moecore.ops for `+` or `.sum()`.
    code = (
        "import sys; from moecore.autograd import tensor; "
        "x = tensor([1.0, 2.0], requires_grad=True); (x * x + 1).sum().backward(); "
        "print(x.grad.tolist(), 'moecore.ops' in sys.modules)"
    )
    assert _fresh(code) == "[2.0, 4.0] False"


def test_package_names_load_lazily_and_stay_listed() -> None:
    import moecore
    import moecore.autograd

    assert set(moecore.__all__) <= set(dir(moecore))
    for name in moecore.__all__:
        assert getattr(moecore, name) is not None
    assert moecore.Tensor is moecore.autograd.Tensor
    assert moecore.no_grad is moecore.autograd.no_grad
    from moecore import Tensor, ops

    assert Tensor is moecore.autograd.Tensor
    assert ops.add is moecore.ops.add
    with pytest.raises(AttributeError, match="no attribute 'Tensr'"):
        _ = moecore.Tensr


def test_submodules_load_on_attribute_access_in_a_fresh_interpreter() -> None:
    # `import moecore; moecore.autograd.gradcheck` worked when the package loaded eagerly.
    code = (
        "import sys, moecore; print('moecore.nn' in sys.modules, "
        "moecore.autograd.gradcheck.__name__, moecore.nn.Linear.__name__)"
    )
    assert _fresh(code) == "False gradcheck Linear"


def test_from_moecore_import_names_in_a_fresh_interpreter() -> None:
    code = (
        "from moecore import Tensor, errors, no_grad, ops, tensor; import moecore.dist as d; "
        "import moecore.distributed as dd; "
        "print(type(tensor([1.0]) + 1).__name__, ops.matmul.__module__, d.init is dd.init)"
    )
    assert _fresh(code) == "Tensor moecore.autograd.primitives.matmul True"
