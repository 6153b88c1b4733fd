"""Kernel dispatch: ``moecore.kernels.registry`` is the one place that chooses an
implementation, by (family, device, dtype).

Checked here: every registered key returns the implementation this file expects (a table
written out independently of the registry's); an unsupported key raises
``NotImplementedError`` naming family, device and dtype; ``select_for`` derives the key from
arrays (CuPy ones faked by their type's module, as moecore detects them, so no GPU is
needed) and falls back to the array-module implementation for layouts a kernel refuses and
for mixed arrays; each MoE backend has every method of the ``MoEKernels`` protocol with the
same parameters; and source walks (AST) that keep the layering: nothing in ``ops/``,
``optim/``, ``compress.py`` or ``sparse.py`` names ``_core`` or ``kernels.cuda``, nothing in
``kernels/`` imports a higher layer, and there is one ``is_cupy_array``.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for np.dtype("bfloat16"))
import numpy as np
import pytest

from moecore.kernels import registry
from moecore.kernels.moe import MoEKernels, moe_kernels_for

PACKAGE = Path(registry.__file__).resolve().parents[1]

EXPECTED = {
    ("moe", "cpu", "float32"): "moecore.moe_kernels",
    ("moe", "cpu", "float64"): "moecore.kernels.generic",
    ("moe", "cuda", "float32"): "moecore.kernels.cuda.moe_kernels",
    ("moe", "cuda", "float64"): "moecore.kernels.generic",
    ("bsr", "cpu", "float32"): "moecore.kernels.bsr.RustBsr",
    ("bsr", "cpu", "float64"): "moecore.kernels.bsr.DenseBsr",
    ("bsr", "cuda", "float32"): "moecore.kernels.bsr.CudaBsr",
    ("bsr", "cuda", "float64"): "moecore.kernels.bsr.DenseBsr",
    ("topk", "cpu", "float32"): "moecore.kernels.topk.RustTopK",
    ("topk", "cuda", "float32"): "moecore.kernels.topk.CudaTopK",
    ("adamw", "cpu", "float32"): "moecore.kernels.adamw.RustAdamW",
    ("adamw", "cpu", "float64"): "moecore.kernels.adamw.ArrayAdamW",
    ("adamw", "cuda", "float32"): "moecore.kernels.adamw.CudaAdamW",
    ("adamw", "cuda", "float64"): "moecore.kernels.adamw.ArrayAdamW",
    ("attention", "cpu", "float32"): "moecore.kernels.attention.RustAttention",
    ("attention", "cpu", "float64"): "moecore.kernels.attention.ArrayAttention",
    ("attention", "cuda", "float32"): "moecore.kernels.attention.ArrayAttention",
    ("attention", "cuda", "float64"): "moecore.kernels.attention.ArrayAttention",
    ("norm", "cpu", "float32"): "moecore.kernels.norm.RustNorm",
    ("norm", "cpu", "float64"): "moecore.kernels.norm.ArrayNorm",
    ("norm", "cuda", "float32"): "moecore.kernels.norm.ArrayNorm",
    ("norm", "cuda", "float64"): "moecore.kernels.norm.ArrayNorm",
    ("activation", "cpu", "float32"): "moecore.kernels.activation.RustActivation",
    ("activation", "cpu", "float64"): "moecore.kernels.activation.ArrayActivation",
    ("activation", "cuda", "float32"): "moecore.kernels.activation.ArrayActivation",
    ("activation", "cuda", "float64"): "moecore.kernels.activation.ArrayActivation",
    ("moe", "cpu", "bfloat16"): "moecore.kernels.moe_bf16",
    ("attention", "cpu", "bfloat16"): "moecore.kernels.bf16.BF16Attention",
    ("attention", "cpu", "float16"): "moecore.kernels.lowp.DoorwayAttention",
    ("norm", "cpu", "bfloat16"): "moecore.kernels.bf16.BF16Norm",
    ("norm", "cpu", "float16"): "moecore.kernels.lowp.DoorwayNorm",
    ("linear", "cpu", "float32"): "moecore.kernels.linear.ArrayLinear",
    ("linear", "cpu", "float64"): "moecore.kernels.linear.ArrayLinear",
    ("linear", "cpu", "float16"): "moecore.kernels.linear.ArrayLinear",
    ("linear", "cuda", "float32"): "moecore.kernels.linear.ArrayLinear",
    ("linear", "cuda", "float64"): "moecore.kernels.linear.ArrayLinear",
    ("linear", "cuda", "float16"): "moecore.kernels.linear.ArrayLinear",
    ("linear", "cpu", "bfloat16"): "moecore.kernels.bf16.BF16Linear",
    ("activation", "cpu", "bfloat16"): "moecore.kernels.bf16.BF16Activation",
}


def _qualified(impl: object) -> str:
    if inspect.ismodule(impl):
        return impl.__name__
    return f"{impl.__module__}.{impl.__qualname__}"


class FakeCupyArray:
    """Stands for a ``cupy.ndarray``: moecore recognises CuPy arrays by their type's module."""

    __module__ = "cupy"

    def __init__(self, dtype: object, shape: tuple[int, ...] = (4,)) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = shape


# --- the selector -----------------------------------------------------------------------------


def test_the_table_covers_the_eight_families_and_no_more():
    assert set(registry.FAMILIES) == {
        "moe",
        "bsr",
        "topk",
        "adamw",
        "attention",
        "norm",
        "activation",
        "linear",
    }
    assert set(registry.IMPLEMENTATIONS) == set(EXPECTED)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_every_registered_key_selects_the_expected_implementation(key):
    family, device, dtype = key
    assert _qualified(registry.select(family, device, np.dtype(dtype))) == EXPECTED[key]
    # the dtype may be given as a numpy type or a name; the answer is the same object
    # (bfloat16 is ml_dtypes' type, named by numpy once ml_dtypes is loaded)
    as_type = getattr(np, dtype, None) or np.dtype(dtype).type
    assert registry.select(family, device, as_type) is registry.select(*key)


@pytest.mark.parametrize(
    "family, device, dtype",
    [("bsr", "cuda", np.float16), ("topk", "cpu", np.float64), ("moe", "tpu", np.float32)],
)
def test_an_unsupported_key_raises_naming_family_device_and_dtype(family, device, dtype):
    with pytest.raises(NotImplementedError) as info:
        registry.select(family, device, dtype)
    message = str(info.value)
    assert repr(family) in message and repr(device) in message
    assert np.dtype(dtype).name in message
    assert "implemented:" in message


def test_select_for_derives_the_key_from_the_arrays():
    x32, x64 = np.ones((2, 4), np.float32), np.ones((2, 4), np.float64)
    assert _qualified(registry.select_for("norm", x32, None, None)).endswith("RustNorm")
    assert _qualified(registry.select_for("norm", x64)).endswith("ArrayNorm")
    assert _qualified(registry.select_for("bsr", FakeCupyArray(np.float32))).endswith("CudaBsr")
    assert moe_kernels_for(FakeCupyArray(np.float32)).__name__ == (
        "moecore.kernels.cuda.moe_kernels"
    )
    with pytest.raises(NotImplementedError, match=r"'moe'.*'cpu'.*float16"):
        moe_kernels_for(np.ones(3, np.float16))


def test_refused_layouts_and_mixed_arrays_go_to_the_array_module_implementation():
    x32 = np.ones((4, 6), np.float32)
    strided = x32[:, ::2]
    assert _qualified(registry.select_for("activation", strided)).endswith("ArrayActivation")
    read_only = x32.copy()
    read_only.flags.writeable = False
    assert _qualified(registry.select_for("adamw", read_only)).endswith("ArrayAdamW")
    w2d = np.ones((6, 6), np.float32)  # a 2-D norm weight: not the Rust kernel's
    assert _qualified(registry.select_for("norm", x32, w2d)).endswith("ArrayNorm")
    mixed = registry.select_for("moe", x32, np.ones((4, 6), np.float64))
    assert mixed.__name__ == "moecore.kernels.generic"
    on_two_devices = registry.select_for("moe", x32, FakeCupyArray(np.float32))
    assert on_two_devices.__name__ == "moecore.kernels.generic"


def test_a_cpu_run_never_imports_cupy_or_the_cuda_host_code():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import moecore as mc
        from moecore import compress, nn, sparse
        from moecore.optim import AdamW

        mc.manual_seed(0)
        layer = nn.MoE(8, 16, n_experts=4, top_k=2)
        norm = nn.LayerNorm(8)
        x = mc.Tensor(np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32))
        opt = AdamW(list(layer.parameters()) + list(norm.parameters()))
        (layer(norm(x)) ** 2).mean().backward()
        opt.step()
        w = sparse.BsrMatrix.random((16, 16), 8, density=0.5, seed=0)
        sparse.bsr_linear(np.ones((2, 16), np.float32), w)
        compress.TopK(ratio=0.5).compress(np.ones(10, np.float32), name="g")
        loaded = [m for m in sys.modules if m.split(".")[0] in ("cupy", "cupyx")
                  or m.startswith("moecore.kernels.cuda")]
        print(loaded)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- the MoE protocol -------------------------------------------------------------------------


def _protocol_methods() -> dict[str, inspect.Signature]:
    names = [n for n, v in vars(MoEKernels).items() if inspect.isfunction(v) and n[0] != "_"]
    out = {}
    for name in names:
        sig = inspect.signature(getattr(MoEKernels, name))
        out[name] = sig.replace(parameters=list(sig.parameters.values())[1:])  # drop self
    return out


def _shape(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_protocol_names_what_ops_moe_calls():
    source = (PACKAGE / "ops" / "moe.py").read_text()
    called = {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "kern"
    }
    assert called and called <= set(_protocol_methods())


@pytest.mark.parametrize(
    "module",
    [
        "moecore.moe_kernels",
        "moecore.kernels.cuda.moe_kernels",
        "moecore.kernels.generic",
        "moecore.kernels.moe_bf16",
    ],
)
def test_each_moe_backend_satisfies_the_protocol(module):
    backend = __import__(module, fromlist=["_"])
    for name, want in _protocol_methods().items():
        fn = getattr(backend, name, None)
        assert callable(fn), f"{module} lacks {name}"
        assert _shape(inspect.signature(fn)) == _shape(want), f"{module}.{name}"


def test_the_protocol_check_fails_on_a_wrong_signature():
    """The structural check above is a real check: a backend whose function renames a
    parameter fails it."""
    want = _protocol_methods()["permute_backward"]

    def permute_backward(dx_sorted, order, n_tokens, kk):
        return None

    assert _shape(inspect.signature(permute_backward)) != _shape(want)


@pytest.mark.parametrize(
    "family, methods",
    [
        ("bsr", ("linear", "linear_dx", "linear_dw")),
        ("adamw", ("adamw_step",)),
        ("attention", ("forward", "backward")),
        ("norm", ("forward", "backward")),
        ("activation", ("gelu_forward", "gelu_backward")),
    ],
)
def test_a_familys_implementations_share_their_signatures(family, methods):
    impls = {registry.select(*key) for key in registry.IMPLEMENTATIONS if key[0] == family}
    assert len(impls) >= 2
    for name in methods:
        shapes = {str(_shape(inspect.signature(getattr(i, name)))) for i in impls}
        assert len(shapes) == 1, f"{family}.{name}: {shapes}"


# --- layering (source walks) ------------------------------------------------------------------


def below_kernels_references(source: str) -> list[str]:
    """Every place ``source`` names ``_core`` or ``kernels.cuda`` (imports, attributes,
    names): what must go through ``moecore.kernels`` instead."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if "_core" in a.name or "kernels.cuda" in a.name]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for a in node.names:
                full = f"{module}.{a.name}"
                if "_core" in full.split(".") or "kernels.cuda" in full:
                    found.append(full)
        elif isinstance(node, ast.Attribute) and node.attr == "_core":
            found.append(f"line {node.lineno}: ._core")
        elif isinstance(node, ast.Name) and node.id == "_core":
            found.append(f"line {node.lineno}: _core")
    return found


def _files(*parts: str) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        path = PACKAGE / part
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def test_the_guard_catches_a_planted_reference():
    planted = [
        "from moecore import _core",
        "import moecore._core as c",
        "from moecore.kernels import cuda",
        "from moecore.kernels.cuda import adamw_step",
        "import moecore.kernels.cuda.bsr",
        "y = moecore._core.fused_gelu(x)",
    ]
    for line in planted:
        assert below_kernels_references(line), line
    assert not below_kernels_references("from moecore.kernels import bsr\nx = core_count")


def test_ops_optim_compress_and_sparse_call_kernels_and_nothing_below():
    offenders = {}
    for path in _files("ops", "optim", "compress.py", "sparse.py"):
        found = below_kernels_references(path.read_text())
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert offenders == {}


HIGHER = ("ops", "nn", "autograd", "models", "train", "distributed", "dist", "cli")


def test_kernels_never_import_a_higher_layer():
    offenders = []
    for path in _files("kernels"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "moecore" and len(parts) > 1 and parts[1] in HIGHER:
                    offenders.append(f"{path.relative_to(PACKAGE)}: {name}")
    assert offenders == []


def test_there_is_one_cupy_check():
    defined = []
    for path in _files("."):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and "cupy" in node.name.lower():
                if node.name.startswith(("is_", "_is")):
                    defined.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert defined == ["backend.py: is_cupy_array"]
