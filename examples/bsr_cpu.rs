//! Single-thread CPU time of the BSR kernels, robust to a loaded machine (wall-clock benchmarks
//! are not): one rayon thread, `CLOCK_PROCESS_CPUTIME_ID`, best of a few runs. Same shapes as
//! `benches/bsr.rs` (W 4096×4096, 6.25 % of blocks kept); GFLOP/s count the kept blocks only
//! (2·N·nnzb·B²). With `dense` it also times the dense product by the `gemm` crate on one
//! thread (2·N·4096²), the ceiling to compare with in the same run.
//!
//! Run: `cargo run --release --example bsr_cpu -- [N,N..] [B,B..] [dense]`
//! (defaults: N = 512,4096; B = 16,32,64).

use _core::sparse::bsr::{bsr_linear, bsr_linear_dw, bsr_linear_dx};

#[path = "../benches/support/bsr_inputs.rs"]
mod bsr_inputs;

use bsr_inputs::{dense_gemm, pattern, values, SIZE};

/// CPU seconds used by this process so far.
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The least CPU time of `reps` runs, after one warm-up run.
fn best(reps: usize, mut work: impl FnMut()) -> f64 {
    work();
    (0..reps)
        .map(|_| {
            let start = cpu_seconds();
            work();
            cpu_seconds() - start
        })
        .fold(f64::MAX, f64::min)
}

fn list(arg: Option<&String>, default: &[usize]) -> Vec<usize> {
    arg.map_or(default.to_vec(), |a| {
        a.split(',').map(|v| v.parse().expect("a number")).collect()
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ns = list(args.get(1), &[512, 4096]);
    let blocks = list(args.get(2), &[16, 32, 64]);
    let dense = args.get(3).is_some_and(|a| a == "dense");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a rayon pool");
    pool.install(|| {
        let mut state = 0x1234_5678_9abc_def1u64;
        for &n in &ns {
            let x = values(n * SIZE, &mut state);
            let dy = values(n * SIZE, &mut state);
            let mut out = vec![0.0f32; n * SIZE];
            let reps = if n > 1024 { 3 } else { 8 };
            if dense {
                let w = values(SIZE * SIZE, &mut state);
                let t = best(2, || {
                    dense_gemm(&x, &w, n, &mut out, gemm::Parallelism::None)
                });
                let gflops = 2.0 * (n * SIZE * SIZE) as f64 / t / 1e9;
                println!("N={n} dense (gemm crate): {gflops:.1} GFLOP/s");
            }
            for &b in &blocks {
                let p = pattern(b, &mut state);
                let data = values(p.data_len(), &mut state);
                let mut dw = vec![0.0f32; p.data_len()];
                let flop = 2.0 * (n * p.data_len()) as f64;
                let fwd = best(reps, || {
                    bsr_linear(&x, n, &p, &data, None, &mut out).expect("forward")
                });
                let dx = best(reps, || {
                    bsr_linear_dx(&dy, n, &p, &data, &mut out).expect("dx")
                });
                let dwt = best(reps, || bsr_linear_dw(&dy, &x, n, &p, &mut dw).expect("dw"));
                println!(
                    "N={n} B={b}: forward {:.1}  dx {:.1}  dW {:.1} GFLOP/s",
                    flop / fwd / 1e9,
                    flop / dx / 1e9,
                    flop / dwt / 1e9
                );
            }
        }
    });
}
