//! The exceptions moecore raises, each defined once here and re-exported by `moecore.errors`.
//!
//! Each subclasses the builtin a user would already catch, so `except ValueError` keeps working.

use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyValueError};

create_exception!(
    moecore.errors,
    PoolMisuse,
    PyValueError,
    "A pool was used wrongly: double free, a pointer it does not own, a bad size or alignment."
);
create_exception!(
    moecore.errors,
    PoolOutOfMemory,
    PyMemoryError,
    "A pool request would exceed the pool's byte limit or its backing could not supply memory."
);
create_exception!(
    moecore.errors,
    CorruptPayload,
    PyValueError,
    "A compressed payload failed validation: truncated, corrupted, foreign or inconsistent."
);
create_exception!(
    moecore.errors,
    NonFiniteGradient,
    PyValueError,
    "A gradient given to a compressor holds NaN or ±inf (nothing was compressed or accumulated)."
);
create_exception!(
    moecore.errors,
    InternalError,
    PyRuntimeError,
    "A bug inside moecore (a Rust panic caught at the boundary); please report it."
);
create_exception!(
    moecore.errors,
    SchedulerMisuse,
    PyValueError,
    "The communication scheduler was given bad gradients, a bad config, or called out of order."
);
