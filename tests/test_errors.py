"""The exception classes subclass the builtins users already catch, and every exception
class of the package is importable from ``moecore.errors``."""

import importlib
import pkgutil

import pytest

import moecore
from moecore import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.PoolMisuse, ValueError),
        (errors.PoolOutOfMemory, MemoryError),
        (errors.CorruptPayload, ValueError),
        (errors.InternalError, RuntimeError),
        (errors.SchedulerMisuse, ValueError),
        (errors.ConfigError, ValueError),
        (errors.DataError, ValueError),
        (errors.CheckpointError, ValueError),
        (errors.CheckpointDamaged, errors.CheckpointError),
        (errors.SafetensorsError, ValueError),
        (errors.TrainingDiverged, RuntimeError),
        (errors.GradcheckError, AssertionError),
        (errors.CompileFailure, RuntimeError),
        (errors.NonFiniteInput, ValueError),
    ],
)
def test_exceptions_subclass_builtins(cls, builtin):
    assert issubclass(cls, builtin)
    assert cls.__module__ == "moecore.errors"
    with pytest.raises(builtin, match="boom"):
        raise cls(["boom"] if cls is errors.ConfigError else "boom")


def test_every_exception_class_of_the_package_is_in_moecore_errors():
    """Walks every module of the package (those needing an optional dependency that is not
    installed, such as CuPy or mpi4py, are passed over) and finds each exception class
    defined or imported there: each must be the same object in ``moecore.errors``."""
    found = {}
    for info in pkgutil.walk_packages(moecore.__path__, "moecore."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("moecore")
            ):
                found[value.__qualname__] = value
    assert {"ConfigError", "CheckpointError", "TrainingDiverged"} <= set(found)  # the walk works
    missing = [name for name, cls in found.items() if getattr(errors, name, None) is not cls]
    assert not missing, f"not importable from moecore.errors: {missing}"
    assert set(errors.__all__) >= set(found)
