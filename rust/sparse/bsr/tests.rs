//! The kernels against a plain dense reference, for every instruction set this CPU has, on
//! shapes chosen to hit every edge (no rows, one row, rows not a multiple of the tile, empty
//! block-rows and block-columns, density 0 and 1, every block size), plus property tests.

use proptest::prelude::*;

use super::linear::Sweep;
use super::*;

/// A small deterministic generator (xorshift), so the tests need no extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn value(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn values(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.value()).collect()
    }
}

/// A random pattern keeping each block with probability `density` (exactly none at 0 and all
/// at 1), and random data for it.
fn random_matrix(
    rows: usize,
    cols: usize,
    b: usize,
    density: f64,
    rng: &mut Rng,
) -> (BsrPattern, Vec<f32>) {
    let (nbr, nbc) = (rows / b, cols / b);
    let mut indptr = vec![0i64];
    let mut indices = Vec::new();
    for _ in 0..nbr {
        for j in 0..nbc {
            let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            if u < density {
                indices.push(j as i64);
            }
        }
        indptr.push(indices.len() as i64);
    }
    let pattern = BsrPattern::new(rows, cols, b, &indptr, &indices).unwrap();
    let data = rng.values(pattern.data_len());
    (pattern, data)
}

/// The dense `[rows, cols]` matrix the pattern and data describe.
fn to_dense(p: &BsrPattern, data: &[f32]) -> Vec<f32> {
    let b = p.block();
    let mut dense = vec![0.0f32; p.rows() * p.cols()];
    for blk in 0..p.nnzb() {
        let (i, j) = (p.block_row_of()[blk] as usize, p.indices()[blk] as usize);
        for r in 0..b {
            for c in 0..b {
                dense[(i * b + r) * p.cols() + j * b + c] = data[blk * b * b + r * b + c];
            }
        }
    }
    dense
}

/// `a [m, k] · bᵀ` with `b [n, k]`, accumulated in f64.
fn matmul_nt(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k)
                .map(|t| a[i * k + t] as f64 * b[j * k + t] as f64)
                .sum();
        }
    }
    c
}

fn transpose(a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut t = vec![0.0; a.len()];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

/// Every element within `tol · (1 + |reference|)`; the depth of the sums here is at most a few
/// hundred terms of values in [-1, 1], where f32 accumulation stays far inside 1e-4 relative.
fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            ((g as f64) - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {k}: got {g}, want {w}"
        );
    }
}

const TOL: f64 = 1e-4;

/// Checks forward, dX and dW for one configuration against the dense reference.
fn check_all(isa: Isa, n: usize, rows: usize, cols: usize, b: usize, density: f64, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (p, data) = random_matrix(rows, cols, b, density, &mut rng);
    let dense = to_dense(&p, &data);
    let x = rng.values(n * cols);
    let dy = rng.values(n * rows);
    let bias = rng.values(rows);
    let what = format!("{isa:?} n={n} {rows}x{cols} B={b} density={density}");

    // Outputs start as NaN so a missed element shows.
    let mut y = vec![f32::NAN; n * rows];
    bsr_linear_with(isa, &x, n, &p, &data, Some(&bias), &mut y).unwrap();
    let mut want = matmul_nt(&x, &dense, n, cols, rows);
    for (k, w) in want.iter_mut().enumerate() {
        *w += bias[k % rows.max(1)] as f64;
    }
    assert_close(&y, &want, TOL, &format!("forward+bias {what}"));

    let mut y = vec![f32::NAN; n * rows];
    bsr_linear_with(isa, &x, n, &p, &data, None, &mut y).unwrap();
    assert_close(
        &y,
        &matmul_nt(&x, &dense, n, cols, rows),
        TOL,
        &format!("forward {what}"),
    );

    let mut dx = vec![f32::NAN; n * cols];
    bsr_linear_dx_with(isa, &dy, n, &p, &data, &mut dx).unwrap();
    let dense_t = transpose(&dense, rows, cols);
    assert_close(
        &dx,
        &matmul_nt(&dy, &dense_t, n, rows, cols),
        TOL,
        &format!("dx {what}"),
    );

    let mut dw = vec![f32::NAN; p.data_len()];
    bsr_linear_dw_with(isa, &dy, &x, n, &p, &mut dw).unwrap();
    // Full dense gradient dyᵀ·x, then read off the kept blocks.
    let full = matmul_nt(
        &transpose(&dy, n, rows),
        &transpose(&x, n, cols),
        rows,
        n,
        cols,
    );
    let mut want_dw = Vec::with_capacity(p.data_len());
    for blk in 0..p.nnzb() {
        let (i, j) = (p.block_row_of()[blk] as usize, p.indices()[blk] as usize);
        for r in 0..b {
            for c in 0..b {
                want_dw.push(full[(i * b + r) * cols + j * b + c]);
            }
        }
    }
    assert_close(&dw, &want_dw, TOL, &format!("dw {what}"));

    // The forms that allocate their output (not zeroed first) give bit for bit what the
    // NaN-filled outputs above hold, so they too write every element.
    if isa == Isa::detect() {
        let y_bias = {
            let mut y = vec![f32::NAN; n * rows];
            bsr_linear(&x, n, &p, &data, Some(&bias), &mut y).unwrap();
            y
        };
        let same = |a: &[f32], b: &[f32]| {
            a.iter()
                .map(|v| v.to_bits())
                .eq(b.iter().map(|v| v.to_bits()))
        };
        let got = bsr_linear_vec(&x, n, &p, &data, Some(&bias)).unwrap();
        assert!(same(&got, &y_bias), "forward vec {what}");
        assert!(
            same(&bsr_linear_vec(&x, n, &p, &data, None).unwrap(), &y),
            "forward vec {what}"
        );
        assert!(
            same(&bsr_linear_dx_vec(&dy, n, &p, &data).unwrap(), &dx),
            "dx vec {what}"
        );
        assert!(
            same(&bsr_linear_dw_vec(&dy, &x, n, &p).unwrap(), &dw),
            "dw vec {what}"
        );
    }
}

#[test]
fn every_isa_every_block_many_row_counts() {
    for isa in Isa::available() {
        for b in SUPPORTED_BLOCKS {
            for n in [0, 1, 7, 13, 25, 130] {
                check_all(isa, n, 2 * b, 3 * b, b, 0.5, (n * 131 + b) as u64);
            }
        }
    }
}

#[test]
fn density_zero_and_one_and_empty_dimensions() {
    for isa in Isa::available() {
        for b in [8, 32] {
            check_all(isa, 9, 3 * b, 2 * b, b, 0.0, 1);
            check_all(isa, 9, 3 * b, 2 * b, b, 1.0, 2);
            check_all(isa, 5, 0, 2 * b, b, 1.0, 3);
            check_all(isa, 5, 2 * b, 0, b, 1.0, 4);
        }
    }
}

#[test]
fn deep_reductions_cross_the_row_chunk() {
    // n > ROW_CHUNK makes dW accumulate across chunks; many blocks per row exercise the
    // forward accumulation across blocks.
    for isa in Isa::available() {
        check_all(isa, 300, 64, 256, 16, 0.7, 5);
    }
}

#[test]
fn products_cross_superpanels() {
    // Super-panels of a few row groups (each packed while the one before is computed, into
    // the other of two buffers), the last one partial: forward and dX must still match dense.
    let (n, rows, cols) = (301, 128, 192);
    for isa in Isa::available() {
        for b in SUPPORTED_BLOCKS {
            let mut rng = Rng(29 + b as u64);
            let (p, data) = random_matrix(rows, cols, b, 0.6, &mut rng);
            let dense = to_dense(&p, &data);
            let x = rng.values(n * cols);
            let dy = rng.values(n * rows);
            let bias = rng.values(rows);
            let what = format!("{isa:?} B={b}");
            // Both with the output's pages faulted in ahead (zeros written into the next
            // super-panel's rows while one is computed: a wrong row range would leave zeros).
            for fault_in_output in [false, true] {
                let sweep = |rows_of: usize| Sweep {
                    superpanel_bytes: 40 * rows_of * 4,
                    fault_in_output,
                };
                let mut y = vec![f32::NAN; n * rows];
                linear::forward_swept(isa, &x, n, &p, &data, Some(&bias), &mut y, sweep(cols))
                    .unwrap();
                let mut want = matmul_nt(&x, &dense, n, cols, rows);
                for (k, w) in want.iter_mut().enumerate() {
                    *w += bias[k % rows] as f64;
                }
                assert_close(&y, &want, TOL, &format!("forward {what}"));
                let mut dx = vec![f32::NAN; n * cols];
                linear::dx_swept(isa, &dy, n, &p, &data, &mut dx, sweep(rows)).unwrap();
                let want = matmul_nt(&dy, &transpose(&dense, rows, cols), n, rows, cols);
                assert_close(&dx, &want, TOL, &format!("dx {what}"));
            }
        }
    }
}

#[test]
fn dw_accumulates_across_superpanels() {
    // Super-panels of 64 rows (the packed x and dy panels are rebuilt for each, and dW
    // carries the sum across them), the last one partial:
    // 300 = 4·64 + 44.
    let (n, rows, cols) = (300, 64, 256);
    for isa in Isa::available() {
        for b in SUPPORTED_BLOCKS {
            let mut rng = Rng(11 + b as u64);
            let (p, _) = random_matrix(rows, cols, b, 0.6, &mut rng);
            let dy = rng.values(n * rows);
            let x = rng.values(n * cols);
            let mut dw = vec![f32::NAN; p.data_len()];
            let bytes = 64 * (rows + cols) * 4;
            sddmm::dw_in_superpanels(isa, &dy, &x, n, &p, &mut dw, bytes).unwrap();
            let full = matmul_nt(
                &transpose(&dy, n, rows),
                &transpose(&x, n, cols),
                rows,
                n,
                cols,
            );
            let mut want = vec![0.0f64; p.data_len()];
            for blk in 0..p.nnzb() {
                let (i, j) = (p.block_row_of()[blk] as usize, p.indices()[blk] as usize);
                for r in 0..b {
                    for c in 0..b {
                        want[(blk * b + r) * b + c] = full[(i * b + r) * cols + j * b + c];
                    }
                }
            }
            assert_close(&dw, &want, TOL, &format!("dw {isa:?} B={b}"));
        }
    }
}

#[test]
fn wrong_lengths_are_errors_not_panics() {
    let mut rng = Rng(7);
    let (p, data) = random_matrix(32, 16, 8, 1.0, &mut rng);
    let x = vec![0.0; 3 * 16];
    let mut y = vec![0.0; 3 * 32];
    let err = bsr_linear(&x[1..], 3, &p, &data, None, &mut y).unwrap_err();
    assert!(
        matches!(
            err,
            BsrError::Length {
                arg: "x",
                expected: 48,
                actual: 47,
                ..
            }
        ),
        "{err}"
    );
    let err = bsr_linear_vec(&x[1..], 3, &p, &data, None).unwrap_err();
    assert!(matches!(err, BsrError::Length { arg: "x", .. }), "{err}");
    let err = bsr_linear_dx_vec(&y[..95], 3, &p, &data).unwrap_err();
    assert!(matches!(err, BsrError::Length { arg: "dy", .. }), "{err}");
    let err = bsr_linear_dw_vec(&y, &x[1..], 3, &p).unwrap_err();
    assert!(matches!(err, BsrError::Length { arg: "x", .. }), "{err}");
    let err = bsr_linear(&x, 3, &p, &data[1..], None, &mut y).unwrap_err();
    assert!(matches!(err, BsrError::Length { arg: "data", .. }), "{err}");
    let err = bsr_linear(&x, 3, &p, &data, Some(&[0.0; 31]), &mut y).unwrap_err();
    assert!(matches!(err, BsrError::Length { arg: "bias", .. }), "{err}");
    let mut dx = vec![0.0; 3 * 16];
    let err = bsr_linear_dx(&y[..95], 3, &p, &data, &mut dx).unwrap_err();
    assert!(matches!(err, BsrError::Length { arg: "dy", .. }), "{err}");
    let mut dw = vec![0.0; data.len() - 1];
    let err = bsr_linear_dw(&y, &x, 3, &p, &mut dw).unwrap_err();
    assert!(matches!(err, BsrError::Length { arg: "dw", .. }), "{err}");
    let err = bsr_linear(&x, usize::MAX, &p, &data, None, &mut y).unwrap_err();
    assert!(matches!(err, BsrError::Length { arg: "x", .. }), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// BSR products equal the dense products of `to_dense` for arbitrary small shapes,
    /// densities and row counts.
    #[test]
    fn bsr_matches_dense(
        n in 0usize..40,
        nbr in 0usize..4,
        nbc in 0usize..4,
        b_pick in 0usize..4,
        density in 0.0f64..=1.0,
        seed in any::<u64>(),
    ) {
        let b = SUPPORTED_BLOCKS[b_pick];
        for isa in Isa::available() {
            check_all(isa, n, nbr * b, nbc * b, b, density, seed);
        }
    }
}
