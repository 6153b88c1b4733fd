//! A borrowed row-major matrix: a slice plus its two dimensions, checked once at the boundary.

use super::error::{shape_str, MoeError};

/// A row-major `rows × cols` matrix borrowed from a slice of exactly `rows · cols` elements.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
}

impl<'a, T> Matrix<'a, T> {
    /// Views `data` as `rows × cols`; `arg` names the argument in the error if the lengths
    /// disagree.
    pub fn new(
        arg: &'static str,
        data: &'a [T],
        rows: usize,
        cols: usize,
    ) -> Result<Self, MoeError> {
        match rows.checked_mul(cols) {
            Some(n) if n == data.len() => Ok(Self { data, rows, cols }),
            _ => Err(MoeError::shape(
                arg,
                format!(
                    "{} ({} elements)",
                    shape_str(&[rows, cols]),
                    rows.saturating_mul(cols)
                ),
                format!("{} elements", data.len()),
            )),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// Row `i` (panics if `i >= rows`, an internal invariant once inputs are validated).
    #[inline]
    pub fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// `[rows, cols]`, for error messages.
    pub fn shape(&self) -> String {
        shape_str(&[self.rows, self.cols])
    }

    /// Errors unless this matrix is `rows × cols`.
    pub(crate) fn expect_shape(
        &self,
        arg: &'static str,
        rows: usize,
        cols: usize,
    ) -> Result<(), MoeError> {
        if self.rows == rows && self.cols == cols {
            Ok(())
        } else {
            Err(MoeError::shape(arg, shape_str(&[rows, cols]), self.shape()))
        }
    }
}
