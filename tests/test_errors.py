"""The exception classes subclass the builtins users already catch."""

import pytest

from moecore import errors


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.PoolMisuse, ValueError),
        (errors.PoolOutOfMemory, MemoryError),
        (errors.CorruptPayload, ValueError),
        (errors.InternalError, RuntimeError),
        (errors.SchedulerMisuse, ValueError),
    ],
)
def test_exceptions_subclass_builtins(cls, builtin):
    assert issubclass(cls, builtin)
    assert cls.__module__ == "moecore.errors"
    with pytest.raises(builtin, match="boom"):
        raise cls("boom")
