//! The inputs every BSR benchmark in Rust uses (W 4096×4096 with 6.25 % of its blocks kept,
//! random values), and the dense `gemm` crate product they compare with. Included by
//! `benches/bsr.rs` and `examples/bsr_cpu.rs` (`#[path]`), so both time the same shapes.

use _core::sparse::bsr::BsrPattern;

pub const SIZE: usize = 4096;
/// 1 block in 16 kept: 6.25 %.
pub const DENSITY_INV: usize = 16;

/// xorshift: a small deterministic generator, so the benchmarks need no extra crates.
pub fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// `len` values uniform in [-0.5, 0.5).
pub fn values(len: usize, state: &mut u64) -> Vec<f32> {
    (0..len)
        .map(|_| (rng(state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

/// Exactly nnzb = blocks/16 kept blocks, spread evenly over the block-rows.
pub fn pattern(b: usize, state: &mut u64) -> BsrPattern {
    let nb = SIZE / b;
    let mut indptr = vec![0i64];
    let mut indices = Vec::new();
    for _ in 0..nb {
        let mut row: Vec<i64> = Vec::new();
        while row.len() < nb / DENSITY_INV {
            let j = (rng(state) % nb as u64) as i64;
            if !row.contains(&j) {
                row.push(j);
            }
        }
        row.sort_unstable();
        indices.extend(row);
        indptr.push(indices.len() as i64);
    }
    BsrPattern::new(SIZE, SIZE, b, &indptr, &indices).expect("valid pattern")
}

/// `y [n, SIZE] = x [n, SIZE] · wᵀ` (w `[SIZE, SIZE]`) by the `gemm` crate: the dense ceiling.
pub fn dense_gemm(x: &[f32], w: &[f32], n: usize, y: &mut [f32], parallelism: gemm::Parallelism) {
    assert!(x.len() >= n * SIZE && y.len() >= n * SIZE && w.len() >= SIZE * SIZE);
    // SAFETY: every operand holds the elements the shapes and strides reach (asserted above).
    unsafe {
        gemm::gemm(
            n,
            SIZE,
            SIZE,
            y.as_mut_ptr(),
            1,
            SIZE as isize,
            false,
            x.as_ptr(),
            1,
            SIZE as isize,
            w.as_ptr(),
            SIZE as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
