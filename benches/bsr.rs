//! Criterion benchmark of the BSR kernels (W 4096×4096 with 6.25 % of its blocks kept) against
//! two alternatives in Rust: the same block products done by the `gemm` crate (one call per
//! kept block, parallel over block-rows), and the dense product by `gemm` (the dense ceiling).
//! Throughput is in flops: 2·N·nnzb·B² for the sparse products, 2·N·rows·cols for dense.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;

use _core::sparse::bsr::{bsr_linear, bsr_linear_dw, bsr_linear_dx, BsrPattern};

#[path = "support/bsr_inputs.rs"]
mod bsr_inputs;

use bsr_inputs::{dense_gemm, pattern, values, SIZE};

/// The forward product with the `gemm` crate doing each block product (`Wᵀ_ij` read through
/// swapped strides, so no transposition), parallel over block-rows.
fn forward_with_gemm_crate(x: &[f32], n: usize, p: &BsrPattern, data: &[f32], y: &mut [f32]) {
    let b = p.block();
    let y_addr = y.as_mut_ptr() as usize;
    (0..p.block_rows()).into_par_iter().for_each(|i| {
        let blocks = p.indptr()[i]..p.indptr()[i + 1];
        for (t, blk) in blocks.enumerate() {
            let j = p.indices()[blk] as usize;
            // SAFETY: every pointer and stride stays inside x, data and y (shapes built above);
            // tasks write disjoint column blocks of y.
            unsafe {
                gemm::gemm(
                    n,
                    b,
                    b,
                    (y_addr as *mut f32).add(i * b),
                    1,
                    SIZE as isize,
                    t > 0,
                    x.as_ptr().add(j * b),
                    1,
                    SIZE as isize,
                    data.as_ptr().add(blk * b * b),
                    b as isize, // rhs[k][c] = W[c][k]
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
}

fn bench(c: &mut Criterion) {
    let mut state = 0x1234_5678_9abc_def1u64;
    for n in [512usize, 4096] {
        let x = values(n * SIZE, &mut state);
        let dy = values(n * SIZE, &mut state);
        let mut out = vec![0.0f32; n * SIZE];

        let mut group = c.benchmark_group(format!("bsr_n{n}"));
        group.sample_size(10);
        for b in [16usize, 32, 64] {
            let p = pattern(b, &mut state);
            let data = values(p.data_len(), &mut state);
            let mut dw = vec![0.0f32; p.data_len()];
            group.throughput(Throughput::Elements((2 * n * p.data_len()) as u64));
            group.bench_function(BenchmarkId::new("forward", b), |bench| {
                bench.iter(|| bsr_linear(&x, n, &p, &data, None, &mut out).expect("forward"))
            });
            group.bench_function(
                BenchmarkId::new("forward_gemm_crate_per_block", b),
                |bench| bench.iter(|| forward_with_gemm_crate(&x, n, &p, &data, &mut out)),
            );
            group.bench_function(BenchmarkId::new("dx", b), |bench| {
                bench.iter(|| bsr_linear_dx(&dy, n, &p, &data, &mut out).expect("dx"))
            });
            group.bench_function(BenchmarkId::new("dw", b), |bench| {
                bench.iter(|| bsr_linear_dw(&dy, &x, n, &p, &mut dw).expect("dw"))
            });
        }
        let w = values(SIZE * SIZE, &mut state);
        group.throughput(Throughput::Elements((2 * n * SIZE * SIZE) as u64));
        group.bench_function("dense_gemm_crate", |bench| {
            bench.iter(|| {
                dense_gemm(
                    &x,
                    &w,
                    n,
                    &mut out,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                )
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
