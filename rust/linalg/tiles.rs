//! One output buffer cut into disjoint rectangular tiles that tasks write side by side.
//!
//! A row-major `[R, C]` buffer split by rows only gives contiguous chunks (`chunks_mut`), but
//! the attention kernels write each (batch, head) pair's result into a column band of a packed
//! `[B, T, H·D]` layout: the rows of one pair interleave with the other heads' rows. Slices
//! cannot express that, so a [`Tile`] holds a raw pointer to its corner and the row stride,
//! and [`tiles`] hands out every tile of a grid exactly once, borrowing the buffer for as
//! long as any tile lives: no two tiles share an element, so tasks may write them at once.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// A `rows × cols` window of a row-major buffer whose rows are `rs` floats apart; the only
/// handle to those elements while it lives.
pub(crate) struct Tile<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    _buffer: PhantomData<&'a mut [MaybeUninit<f32>]>,
}

// SAFETY: a tile is the unique handle to its elements (see `tiles`), like a `&mut` slice, so
// moving it to another thread cannot create shared mutable access.
unsafe impl Send for Tile<'_> {}

impl Tile<'_> {
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Pointer to element `(row, 0)`, the number of floats from there to the tile's last
    /// element plus one, and the row stride: the raw destination a GEMM of `rows - row` rows
    /// may write. Panics if `row > rows`.
    pub(crate) fn raw_from_row(&mut self, row: usize) -> (*mut f32, usize, usize) {
        assert!(
            row <= self.rows,
            "tile: row {row} beyond {} rows",
            self.rows
        );
        let left = self.rows - row;
        let len = if left == 0 || self.cols == 0 {
            0
        } else {
            (left - 1) * self.rs + self.cols
        };
        // SAFETY: `row <= rows`, so the offset stays inside (or one past) the tile's span,
        // which lies inside the buffer `tiles` split.
        (unsafe { self.ptr.add(row * self.rs) }, len, self.rs)
    }
}

/// The tiles of `buf` viewed as `[R, C]` row-major (`C` = `row_len`), cut into blocks of
/// `tile_rows × tile_cols`, in row-major order of the grid: tile `(i, j)` is at index
/// `i · (C / tile_cols) + j`. Panics (an internal bug) unless the sizes divide evenly.
pub(crate) fn tiles(
    buf: &mut [MaybeUninit<f32>],
    row_len: usize,
    tile_rows: usize,
    tile_cols: usize,
) -> Vec<Tile<'_>> {
    if buf.is_empty() {
        return Vec::new();
    }
    assert!(
        tile_rows > 0
            && tile_cols > 0
            && row_len.is_multiple_of(tile_cols)
            && buf.len().is_multiple_of(row_len * tile_rows),
        "tiles: {} floats do not split into {tile_rows}x{tile_cols} tiles of rows of {row_len}",
        buf.len()
    );
    let (grid_rows, grid_cols) = (buf.len() / (row_len * tile_rows), row_len / tile_cols);
    let base = buf.as_mut_ptr().cast::<f32>();
    let mut out = Vec::with_capacity(grid_rows * grid_cols);
    for i in 0..grid_rows {
        for j in 0..grid_cols {
            out.push(Tile {
                // SAFETY: i · tile_rows · row_len + j · tile_cols < buf.len() by the asserted
                // divisibility, so the corner is inside the buffer.
                ptr: unsafe { base.add(i * tile_rows * row_len + j * tile_cols) },
                rows: tile_rows,
                cols: tile_cols,
                rs: row_len,
                _buffer: PhantomData,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_element_once() {
        let (rows, row_len, tr, tc) = (6, 8, 3, 2);
        let mut buf = vec![MaybeUninit::new(0.0f32); rows * row_len];
        let start = buf.as_ptr() as usize;
        let mut seen = vec![0u32; rows * row_len];
        let mut grid = tiles(&mut buf, row_len, tr, tc);
        assert_eq!(grid.len(), (rows / tr) * (row_len / tc));
        for (n, t) in grid.iter_mut().enumerate() {
            let (ptr, len, rs) = t.raw_from_row(0);
            assert_eq!(len, (tr - 1) * row_len + tc);
            let corner = (ptr as usize - start) / 4;
            assert_eq!(corner, (n / 4) * tr * row_len + (n % 4) * tc, "grid order");
            for r in 0..t.rows() {
                for c in 0..t.cols() {
                    seen[corner + r * rs + c] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "{seen:?}");
    }

    #[test]
    fn raw_from_row_shrinks_the_span() {
        let mut buf = vec![MaybeUninit::new(0.0f32); 4 * 10];
        let mut grid = tiles(&mut buf, 10, 4, 5);
        let (p0, len0, _) = grid[1].raw_from_row(0);
        let (p2, len2, _) = grid[1].raw_from_row(2);
        assert_eq!((p2 as usize - p0 as usize) / 4, 20);
        assert_eq!((len0, len2), (35, 15));
        assert_eq!(grid[1].raw_from_row(4).1, 0);
    }
}
