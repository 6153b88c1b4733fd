//! One safe doorway to the `gemm` crate's f32 kernel (runtime-dispatched AVX2 / AVX-512).
//!
//! Why `gemm`: it packs panels and runs register-blocked micro-kernels chosen at run time for
//! the CPU (x86-64-v4 with the `x86-v4` feature, i.e. AVX-512 here), and takes arbitrary row
//! and column strides (so transposed operands need no copy). Measured single-threaded on
//! 1024 × 256 × 512 (an expert's block at the benchmark shape): gemm ~98 GFLOP/s at best,
//! the same as OpenBLAS's SkylakeX kernel (~99) on this Zen 4 machine, while
//! `matrixmultiply` (no AVX-512 kernel) reached ~74 in the same run.
//!
//! The caller says whether a call may use rayon's threads (one big expert at a time) or must
//! stay on its thread (small experts side by side, see `grouped`).

use std::mem::MaybeUninit;

use crate::linalg::tiles::Tile;

/// A strided read-only operand: element `(i, j)` lives at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    /// True if every `(i, j)` with `i < rows`, `j < cols` is inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        spans(self.data.len(), rows, cols, self.rs, self.cs)
    }
}

/// True if every element `(i, j)`, `i < rows`, `j < cols`, at `i * rs + j * cs` lies below
/// `len`.
fn spans(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0
        || cols == 0
        || (rows - 1)
            .checked_mul(rs)
            .and_then(|a| (cols - 1).checked_mul(cs).and_then(|b| a.checked_add(b)))
            .is_some_and(|last| last < len)
}

/// With `(m, n, k)` = the shape: `dst[m × n] (row-major, row stride dst_rs) = lhs[m × k] · rhs[k × n]`, on rayon's threads
/// when `threaded` (gemm still stays on one thread for small products), else on this one.
///
/// Panics (an internal bug, caught at the Python boundary) if an operand is too short for
/// the shape; callers validate user input before getting here.
pub(crate) fn matmul(
    shape: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    threaded: bool,
) {
    product_init(shape, dst, dst_rs, lhs, rhs, threaded, false);
}

/// As [`matmul`], but adds the product to `dst`'s values: `dst += lhs · rhs` (gemm reads
/// `dst` in its own pass, so no temporary and no second sweep over memory).
pub(crate) fn matmul_add(
    shape: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    threaded: bool,
) {
    product_init(shape, dst, dst_rs, lhs, rhs, threaded, true);
}

/// As [`matmul`], into memory that need not be initialised: every element of the `m × n`
/// result (row stride `dst_rs`) is written and none is read, so a fresh output buffer needs
/// no zeroing first (calloc of a reused heap block is a memset as large as the output).
pub(crate) fn matmul_uninit(
    shape: (usize, usize, usize),
    dst: &mut [MaybeUninit<f32>],
    dst_rs: usize,
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    threaded: bool,
) {
    let len = dst.len();
    // SAFETY: `dst` is a unique borrow of `len` elements; without `accumulate` the product
    // only stores into them (f32 has no invalid bit patterns to store).
    unsafe {
        product(
            shape,
            dst.as_mut_ptr().cast::<f32>(),
            len,
            dst_rs,
            lhs,
            rhs,
            threaded,
            false,
        )
    };
}

/// As [`matmul_uninit`], into rows `row0 .. row0 + m`, columns `0 .. n` of a tile of a buffer
/// that other tasks are writing beside (the attention kernels' packed outputs).
pub(crate) fn matmul_tile(
    shape: (usize, usize, usize),
    dst: &mut Tile<'_>,
    row0: usize,
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    threaded: bool,
) {
    let (m, n, _) = shape;
    assert!(
        row0 + m <= dst.rows() && n <= dst.cols(),
        "gemm: {m}x{n} at row {row0} outside a {}x{} tile",
        dst.rows(),
        dst.cols()
    );
    let (ptr, len, rs) = dst.raw_from_row(row0);
    // SAFETY: the tile is the only handle to its elements, and the product stores only into
    // rows < m, columns < n ≤ the tile's width (asserted above): elements of the tile, never
    // those of the neighbouring tiles that lie between its rows. Stores need no initialised
    // memory, and the tile borrows a buffer the read-only operands cannot alias.
    unsafe { product(shape, ptr, len, rs, lhs, rhs, threaded, false) };
}

fn product_init(
    shape: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    threaded: bool,
    accumulate: bool,
) {
    let len = dst.len();
    // SAFETY: `dst` is a unique borrow of `len` initialised elements.
    unsafe {
        product(
            shape,
            dst.as_mut_ptr(),
            len,
            dst_rs,
            lhs,
            rhs,
            threaded,
            accumulate,
        )
    };
}

/// The product into `len` floats at `dst` (row stride `dst_rs`).
///
/// # Safety
/// `dst` must be valid for writes of `len` floats and alias neither operand for the call;
/// with `accumulate` they must also be initialised (they are read).
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    len: usize,
    dst_rs: usize,
    lhs: Strided<'_>,
    rhs: Strided<'_>,
    threaded: bool,
    accumulate: bool,
) {
    assert!(
        spans(len, m, n, dst_rs, 1),
        "gemm: dst too short for {m}x{n}"
    );
    assert!(lhs.covers(m, k), "gemm: lhs too short for {m}x{k}");
    assert!(rhs.covers(k, n), "gemm: rhs too short for {k}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if accumulate {
            return;
        }
        for i in 0..m {
            // SAFETY: row i's n elements lie inside `dst` (the span check above).
            unsafe { std::ptr::write_bytes(dst.add(i * dst_rs), 0, n) };
        }
        return;
    }
    let stride = |s: usize| isize::try_from(s).expect("gemm: stride fits isize");
    // SAFETY: the three asserts above prove every element gemm touches (indices below
    // (m-1)·rs + (n-1)·cs and the like) lies inside its buffer; by the contract `dst` aliases
    // neither operand; with read_dst = false gemm never reads dst's old values, with true it
    // reads exactly the elements it writes (initialised, by the contract).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            stride(dst_rs),
            accumulate,
            lhs.data.as_ptr(),
            stride(lhs.cs),
            stride(lhs.rs),
            rhs.data.as_ptr(),
            stride(rhs.cs),
            stride(rhs.rs),
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            if threaded {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: Strided<'_>, b: Strided<'_>) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs])
                    .sum();
            }
        }
        c
    }

    /// The operand whose element `(i, j)` is `data[i·rs + j·cs]`.
    fn view(data: &[f32], rs: usize, cs: usize) -> Strided<'_> {
        Strided { data, rs, cs }
    }

    #[test]
    fn matches_naive_with_transposed_operands() {
        let (m, n, k) = (37, 19, 23);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) - 5.0).collect();
        for (a_view, b_view) in [
            (view(&a, k, 1), view(&b, n, 1)),
            (view(&a, 1, m), view(&b, 1, k)),
        ] {
            let mut c = vec![f32::NAN; m * n];
            matmul((m, n, k), &mut c, n, a_view, b_view, true);
            assert_eq!(
                c,
                naive(m, n, k, a_view, b_view),
                "small integers are exact"
            );
        }
    }

    #[test]
    fn matmul_add_adds_to_dst() {
        let (m, n, k) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
        let (av, bv) = (view(&a, k, 1), view(&b, n, 1));
        let mut c: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        matmul_add((m, n, k), &mut c, n, av, bv, false);
        let want: Vec<f32> = naive(m, n, k, av, bv)
            .iter()
            .enumerate()
            .map(|(i, v)| v + i as f32)
            .collect();
        assert_eq!(c, want);
        matmul_add((m, n, 0), &mut c, n, av, bv, false);
        assert_eq!(c, want, "an empty inner dimension adds nothing");
    }

    #[test]
    fn matmul_uninit_writes_every_element_of_a_strided_dst() {
        // dst rows are 7 apart but 5 wide: the 2 columns between rows must stay untouched.
        let (m, n, k, rs) = (9, 5, 6, 7);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 3 % 7) as f32) - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 9) as f32) - 4.0).collect();
        let (av, bv) = (view(&a, k, 1), view(&b, n, 1));
        let want = naive(m, n, k, av, bv);
        for inner in [k, 0] {
            let mut dst = vec![MaybeUninit::new(f32::NAN); (m - 1) * rs + n];
            matmul_uninit((m, n, inner), &mut dst, rs, av, bv, false);
            for (idx, v) in dst.iter().enumerate() {
                // SAFETY: every element was initialised (NaN) before the call.
                let v = unsafe { v.assume_init() };
                let (i, j) = (idx / rs, idx % rs);
                if j >= n {
                    assert!(v.is_nan(), "gap element ({i}, {j}) was written");
                } else if inner == 0 {
                    assert_eq!(v, 0.0, "empty inner dimension: ({i}, {j})");
                } else {
                    assert_eq!(v, want[i * n + j], "({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn matmul_tile_writes_its_rows_of_its_tile_only() {
        // A [4, 6] buffer cut into four [2, 3] tiles; a 1 x 2 product into rows 1.. of tile 1
        // must land at buffer (1, 3..5) and nowhere else.
        let a = [2.0f32, 3.0];
        let b = [1.0f32, 10.0, 100.0, 1000.0];
        let (av, bv) = (view(&a, 2, 1), view(&b, 2, 1));
        let mut buf = vec![MaybeUninit::new(f32::NAN); 24];
        {
            let mut grid = crate::linalg::tiles::tiles(&mut buf, 6, 2, 3);
            matmul_tile((1, 2, 2), &mut grid[1], 1, av, bv, false);
        }
        for (idx, v) in buf.iter().enumerate() {
            // SAFETY: every element was initialised (NaN) before the call.
            let v = unsafe { v.assume_init() };
            match idx {
                9 => assert_eq!(v, 2.0 + 300.0),
                10 => assert_eq!(v, 20.0 + 3000.0),
                _ => assert!(v.is_nan(), "element {idx} was written"),
            }
        }
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn matmul_tile_refuses_a_product_wider_than_the_tile() {
        let a = [1.0f32; 4];
        let s = view(&a, 1, 1);
        let mut buf = vec![MaybeUninit::new(0.0f32); 8];
        let mut grid = crate::linalg::tiles::tiles(&mut buf, 4, 2, 2);
        matmul_tile((1, 3, 1), &mut grid[0], 0, s, s, false);
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let mut c = vec![f32::NAN; 6];
        let e = view(&[], 0, 0);
        matmul((2, 3, 0), &mut c, 3, e, e, false);
        assert_eq!(c, vec![0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "lhs too short")]
    fn short_operand_panics_instead_of_reading_out_of_bounds() {
        let a = [1.0f32; 5];
        let b = [1.0f32; 6];
        let mut c = [0.0f32; 4];
        matmul((2, 2, 3), &mut c, 2, view(&a, 3, 1), view(&b, 2, 1), false);
    }
}
