//! The sparsity pattern of a BSR matrix: validated once, with the transposed (block-column)
//! index that the `dx` kernel needs computed once alongside it.

use super::error::{BsrError, Result};

/// Block sizes the micro-kernels are built for.
pub const SUPPORTED_BLOCKS: [usize; 4] = [8, 16, 32, 64];

/// A validated block-sparse pattern of a `rows × cols` matrix with `block × block` blocks.
///
/// Block-row `i` stores the blocks `indptr[i]..indptr[i + 1]`; block `b` sits at block-column
/// `indices[b]`. Within a block-row the block-columns are strictly increasing. Block `b`'s
/// values are `data[b * block² .. (b + 1) * block²]`, row-major (the dense layout of the block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BsrPattern {
    rows: usize,
    cols: usize,
    block: usize,
    indptr: Vec<usize>,
    indices: Vec<u32>,
    /// Block-row of every stored block (the inverse of `indptr`), for the dW kernel.
    block_row: Vec<u32>,
    /// The transposed index: block-column `j` holds the entries `t_indptr[j]..t_indptr[j + 1]`
    /// of `t_rows` (their block-row) and `t_blocks` (their block id), sorted by block-row.
    t_indptr: Vec<usize>,
    t_rows: Vec<u32>,
    t_blocks: Vec<u32>,
}

impl BsrPattern {
    /// Validates a pattern given as CSR-of-blocks arrays (any integer width the caller had,
    /// widened to `i64`) and builds its transposed index.
    ///
    /// Rules, each reported by its own [`BsrError`] variant: `block` ∈ {8, 16, 32, 64};
    /// `rows` and `cols` multiples of `block`; `indptr` of length `rows / block + 1`, starting
    /// at 0, non-decreasing, ending at `indices.len()`; every index in `[0, cols / block)`;
    /// indices strictly increasing within a block-row (unsorted and duplicate reported apart).
    pub fn new(
        rows: usize,
        cols: usize,
        block: usize,
        indptr: &[i64],
        indices: &[i64],
    ) -> Result<Self> {
        if !SUPPORTED_BLOCKS.contains(&block) {
            return Err(BsrError::UnsupportedBlock { block });
        }
        for (dim, size) in [("rows", rows), ("cols", cols)] {
            if size % block != 0 {
                return Err(BsrError::ShapeNotDivisible { dim, size, block });
            }
        }
        let n_brows = rows / block;
        let n_bcols = cols / block;
        let limit = u32::MAX as usize;
        for (what, value) in [
            ("cols / block", n_bcols),
            ("rows / block", n_brows),
            ("nnzb", indices.len()),
        ] {
            if value > limit {
                return Err(BsrError::TooLarge { what, value, limit });
            }
        }
        if indptr.len() != n_brows + 1 {
            return Err(BsrError::IndptrLength {
                expected: n_brows + 1,
                actual: indptr.len(),
            });
        }
        if indptr[0] != 0 {
            return Err(BsrError::IndptrStart { actual: indptr[0] });
        }
        for row in 0..n_brows {
            let (start, end) = (indptr[row], indptr[row + 1]);
            if start > end {
                return Err(BsrError::IndptrDecreasing { row, start, end });
            }
        }
        let nnzb = indices.len();
        if indptr[n_brows] != nnzb as i64 {
            return Err(BsrError::IndptrEnd {
                expected: nnzb,
                actual: indptr[n_brows],
            });
        }
        // indptr is now known to be 0 ≤ … ≤ nnzb, so the casts below are lossless.
        let indptr: Vec<usize> = indptr.iter().map(|&p| p as usize).collect();
        let mut block_row = Vec::with_capacity(nnzb);
        let mut checked = Vec::with_capacity(nnzb);
        for row in 0..n_brows {
            let mut previous: Option<i64> = None;
            let start = indptr[row];
            for (position, &index) in (start..).zip(&indices[start..indptr[row + 1]]) {
                if index < 0 || index as u64 >= n_bcols as u64 {
                    return Err(BsrError::IndexOutOfRange {
                        row,
                        position,
                        index,
                        limit: n_bcols,
                    });
                }
                if let Some(previous) = previous {
                    if index == previous {
                        return Err(BsrError::DuplicateBlock {
                            row,
                            position,
                            index,
                        });
                    }
                    if index < previous {
                        // A duplicate further on in an unsorted row is reported as unsorted:
                        // sorting is the first thing to fix.
                        return Err(BsrError::IndicesUnsorted {
                            row,
                            position,
                            previous,
                            index,
                        });
                    }
                }
                previous = Some(index);
                checked.push(index as u32);
                block_row.push(row as u32);
            }
        }
        let (t_indptr, t_rows, t_blocks) = transpose_index(n_bcols, &block_row, &checked);
        Ok(Self {
            rows,
            cols,
            block,
            indptr,
            indices: checked,
            block_row,
            t_indptr,
            t_rows,
            t_blocks,
        })
    }

    /// Dense number of rows (outputs of `y = x·wᵀ`).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Dense number of columns (inputs of `y = x·wᵀ`).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Block edge `B`.
    pub fn block(&self) -> usize {
        self.block
    }
    /// Number of stored blocks.
    pub fn nnzb(&self) -> usize {
        self.indices.len()
    }
    /// Number of block-rows, `rows / block`.
    pub fn block_rows(&self) -> usize {
        self.rows / self.block
    }
    /// Number of block-columns, `cols / block`.
    pub fn block_cols(&self) -> usize {
        self.cols / self.block
    }
    /// Row pointer: block-row `i` stores blocks `indptr[i]..indptr[i + 1]`.
    pub fn indptr(&self) -> &[usize] {
        &self.indptr
    }
    /// Block-column of every stored block.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }
    /// Block-row of every stored block.
    pub fn block_row_of(&self) -> &[u32] {
        &self.block_row
    }
    /// The stored blocks of block-column `j`: their block-rows and their block ids, both sorted
    /// by block-row.
    pub fn column(&self, j: usize) -> (&[u32], &[u32]) {
        let range = self.t_indptr[j]..self.t_indptr[j + 1];
        (&self.t_rows[range.clone()], &self.t_blocks[range])
    }
    /// Every stored block's id in block-column order (column 0's blocks first, each column's
    /// sorted by block-row): the order in which the dX kernel reads them.
    pub(crate) fn blocks_by_column(&self) -> &[u32] {
        &self.t_blocks
    }
    /// The positions in [`Self::blocks_by_column`] of block-column `j`'s blocks.
    pub(crate) fn column_range(&self, j: usize) -> std::ops::Range<usize> {
        self.t_indptr[j]..self.t_indptr[j + 1]
    }
    /// Number of values in the data array, `nnzb · block²`.
    pub fn data_len(&self) -> usize {
        self.nnzb() * self.block * self.block
    }
}

/// Counting sort of the blocks by block-column; stable, so each column's blocks stay sorted by
/// block-row.
fn transpose_index(
    n_bcols: usize,
    block_row: &[u32],
    indices: &[u32],
) -> (Vec<usize>, Vec<u32>, Vec<u32>) {
    let mut t_indptr = vec![0usize; n_bcols + 1];
    for &j in indices {
        t_indptr[j as usize + 1] += 1;
    }
    for j in 0..n_bcols {
        t_indptr[j + 1] += t_indptr[j];
    }
    let mut next = t_indptr.clone();
    let mut t_rows = vec![0u32; indices.len()];
    let mut t_blocks = vec![0u32; indices.len()];
    for (b, (&j, &i)) in indices.iter().zip(block_row).enumerate() {
        let slot = &mut next[j as usize];
        t_rows[*slot] = i;
        t_blocks[*slot] = b as u32;
        *slot += 1;
    }
    (t_indptr, t_rows, t_blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_valid_pattern_and_transposes_it() {
        // 2 block-rows × 3 block-columns: row 0 has columns {0, 2}, row 1 has {1, 2}.
        let p = BsrPattern::new(16, 24, 8, &[0, 2, 4], &[0, 2, 1, 2]).unwrap();
        assert_eq!(p.nnzb(), 4);
        assert_eq!(p.block_row_of(), &[0, 0, 1, 1]);
        assert_eq!(p.column(0), (&[0u32][..], &[0u32][..]));
        assert_eq!(p.column(1), (&[1u32][..], &[2u32][..]));
        assert_eq!(p.column(2), (&[0u32, 1][..], &[1u32, 3][..]));
        assert_eq!(p.data_len(), 4 * 64);
    }

    #[test]
    fn empty_shapes_and_empty_rows_are_valid() {
        assert_eq!(BsrPattern::new(0, 0, 16, &[0], &[]).unwrap().nnzb(), 0);
        let p = BsrPattern::new(32, 16, 16, &[0, 0, 1], &[0]).unwrap();
        assert_eq!(p.block_row_of(), &[1]);
    }

    #[test]
    fn each_rule_has_its_own_error() {
        use BsrError::*;
        let err = |rows, cols, block, indptr: &[i64], indices: &[i64]| {
            BsrPattern::new(rows, cols, block, indptr, indices).unwrap_err()
        };
        assert_eq!(
            err(16, 16, 12, &[0, 0], &[]),
            UnsupportedBlock { block: 12 }
        );
        assert!(matches!(
            err(20, 16, 8, &[0, 0, 0], &[]),
            ShapeNotDivisible {
                dim: "rows",
                size: 20,
                ..
            }
        ));
        assert!(matches!(
            err(16, 12, 8, &[0, 0, 0], &[]),
            ShapeNotDivisible {
                dim: "cols",
                size: 12,
                ..
            }
        ));
        assert_eq!(
            err(16, 16, 8, &[0, 0], &[]),
            IndptrLength {
                expected: 3,
                actual: 2
            }
        );
        assert_eq!(err(16, 16, 8, &[1, 1, 1], &[0]), IndptrStart { actual: 1 });
        assert_eq!(
            err(16, 16, 8, &[0, 2, 1], &[0]),
            IndptrDecreasing {
                row: 1,
                start: 2,
                end: 1
            }
        );
        assert_eq!(
            err(16, 16, 8, &[0, 1, 1], &[0, 1]),
            IndptrEnd {
                expected: 2,
                actual: 1
            }
        );
        assert!(matches!(
            err(16, 16, 8, &[0, 1, 1], &[2]),
            IndexOutOfRange {
                index: 2,
                limit: 2,
                ..
            }
        ));
        assert!(matches!(
            err(16, 16, 8, &[0, 1, 1], &[-1]),
            IndexOutOfRange { index: -1, .. }
        ));
        assert!(matches!(
            err(16, 16, 8, &[0, 2, 2], &[1, 0]),
            IndicesUnsorted {
                row: 0,
                position: 1,
                ..
            }
        ));
        assert!(matches!(
            err(16, 16, 8, &[0, 0, 2], &[1, 1]),
            DuplicateBlock {
                row: 1,
                position: 1,
                ..
            }
        ));
    }

    #[test]
    fn messages_name_the_rule() {
        let e = BsrPattern::new(16, 16, 8, &[0, 2, 2], &[1, 0]).unwrap_err();
        assert!(e.to_string().contains("not sorted"), "{e}");
        let e = BsrPattern::new(16, 16, 8, &[0, 2, 2], &[1, 1]).unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }
}
