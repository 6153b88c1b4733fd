//! Wall and per-thread CPU time of the MoE expert FFN at the benchmark shape (R = 8192 rows
//! over 8 experts, d 256, hidden 512): the fused GELU FFN kernels against the unfused chain
//! of grouped matmuls and GELU passes, in the same run, so a loaded machine affects both.
//!
//! Run: `cargo run --release --example moe_ffn` (set `RAYON_NUM_THREADS` to compare 1 and 2
//! threads).

use std::time::Instant;

use _core::fused::gelu::{gelu_backward, gelu_forward};
use _core::sparse::moe::{
    gelu_ffn_backward, gelu_ffn_forward, grouped_matmul, grouped_matmul_dw, grouped_matmul_dx,
    Matrix, MatrixStack,
};

const COUNTS: [i32; 8] = [940, 1032, 1063, 1029, 1021, 1018, 1052, 1037];
const D: usize = 256;
const H: usize = 512;

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) / 8.0
        })
        .collect()
}

fn process_cpu() -> f64 {
    let mut ts = libc_timespec::default();
    // SAFETY: clock_gettime writes one timespec into the valid, exclusive `ts`.
    unsafe { clock_gettime(2, &mut ts) }; // CLOCK_PROCESS_CPUTIME_ID
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

#[repr(C)]
#[derive(Default)]
struct libc_timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut libc_timespec) -> i32;
}

fn main() {
    let r: usize = COUNTS.iter().map(|&c| c as usize).sum();
    let e = COUNTS.len();
    let (x, w1, w2, dy) = (
        values(r * D, 1),
        values(e * D * H, 2),
        values(e * H * D, 3),
        values(r * D, 4),
    );
    let xm = Matrix::new("x", &x, r, D).unwrap();
    let w1s = MatrixStack::new("w1", &w1, e, D, H).unwrap();
    let w2s = MatrixStack::new("w2", &w2, e, H, D).unwrap();
    let dym = Matrix::new("dy", &dy, r, D).unwrap();
    let unfused = || {
        let h = grouped_matmul(xm, &COUNTS, w1s).unwrap();
        let mut a = vec![0.0; h.len()];
        gelu_forward(&h, &mut a).unwrap();
        let am = Matrix::new("a", &a, r, H).unwrap();
        let _y = grouped_matmul(am, &COUNTS, w2s).unwrap();
        let da = grouped_matmul_dx(dym, &COUNTS, w2s).unwrap();
        let _dw2 = grouped_matmul_dw(am, dym, &COUNTS).unwrap();
        let mut dh = vec![0.0; da.len()];
        gelu_backward(&da, &h, &mut dh).unwrap();
        let dhm = Matrix::new("dh", &dh, r, H).unwrap();
        let _dx = grouped_matmul_dx(dhm, &COUNTS, w1s).unwrap();
        let _dw1 = grouped_matmul_dw(xm, dhm, &COUNTS).unwrap();
    };
    let fused = || {
        let f = gelu_ffn_forward(xm, &COUNTS, w1s, w2s).unwrap();
        let hm = Matrix::new("h", &f.h, r, H).unwrap();
        let am = Matrix::new("a", &f.a, r, H).unwrap();
        let _g = gelu_ffn_backward(xm, &COUNTS, w1s, w2s, hm, am, dym).unwrap();
    };
    let flop = 6.0 * 2.0 * (r * D * H) as f64;
    println!("threads: {}", rayon::current_num_threads());
    for round in 0..6 {
        for (name, f) in [("unfused", &unfused as &dyn Fn()), ("fused", &fused)] {
            let (w0, c0) = (Instant::now(), process_cpu());
            f();
            let (w, c) = (w0.elapsed().as_secs_f64(), process_cpu() - c0);
            if round > 0 {
                println!(
                    "{name:8} wall {:6.1} ms  cpu {:6.1} ms  {:5.1} GFLOP/s wall",
                    w * 1e3,
                    c * 1e3,
                    flop / w * 1e-9
                );
            }
        }
    }
}
