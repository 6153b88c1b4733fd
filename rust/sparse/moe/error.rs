//! The one error type of the MoE kernels: bad input, always naming the argument at fault.

use thiserror::Error;

/// Why a MoE kernel refused its input. Every variant names the argument, what was expected
/// and what was given, so the message alone tells the caller what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MoeError {
    /// An array's shape does not match what the other arguments imply.
    #[error("{arg}: expected shape {expected}, got {actual}")]
    Shape {
        arg: &'static str,
        expected: String,
        actual: String,
    },
    /// A scalar argument (k, capacity, n_groups …) is outside its allowed range.
    #[error("{arg}: expected {expected}, got {actual}")]
    Value {
        arg: &'static str,
        expected: String,
        actual: String,
    },
    /// One entry of an array (an index, a count, a logit) is out of range or inconsistent.
    #[error("{arg}{position}: expected {expected}, got {actual}")]
    Entry {
        arg: &'static str,
        position: String,
        expected: String,
        actual: String,
    },
    /// An output would not fit in memory (e.g. an absurd `pad_to`).
    #[error("{what}: cannot allocate {bytes} bytes for the result")]
    OutOfMemory { what: &'static str, bytes: usize },
}

impl From<crate::linalg::buffers::OutOfMemory> for MoeError {
    fn from(err: crate::linalg::buffers::OutOfMemory) -> Self {
        MoeError::OutOfMemory {
            what: err.what,
            bytes: err.bytes,
        }
    }
}

impl MoeError {
    pub(crate) fn shape(
        arg: &'static str,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Self {
        Self::Shape {
            arg,
            expected: expected.into(),
            actual: actual.into(),
        }
    }

    pub(crate) fn value(
        arg: &'static str,
        expected: impl Into<String>,
        actual: impl ToString,
    ) -> Self {
        Self::Value {
            arg,
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }

    /// An entry of a 1-D array (`position` = flat index) or of a 2-D array (`[row, col]`).
    pub(crate) fn entry(
        arg: &'static str,
        position: &[usize],
        expected: impl Into<String>,
        actual: impl ToString,
    ) -> Self {
        let position = format!(
            "[{}]",
            position
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Self::Entry {
            arg,
            position,
            expected: expected.into(),
            actual: actual.to_string(),
        }
    }
}

/// `[a, b, …]`, the way numpy users read shapes.
pub(crate) fn shape_str(dims: &[usize]) -> String {
    format!(
        "[{}]",
        dims.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}
