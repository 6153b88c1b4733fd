//! Criterion benches of the MoE kernels at the shapes: T = 4096 tokens, d = 256,
//! E = 8 experts, k = 2, expert hidden 512.
//!
//! `grouped_matmul/*` also times the schedule we did not take for big experts — all experts
//! side by side, one single-threaded GEMM each — against the one we took (big experts one at
//! a time, threaded inside gemm).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use rayon::prelude::*;

use _core::sparse::moe::{
    grouped_matmul, grouped_matmul_dw, grouped_matmul_dx, permute, route, unpermute,
    unpermute_backward, Matrix, MatrixStack, PermuteOptions, RouteOptions, Score,
};

const T: usize = 4096;
const D: usize = 256;
const E: usize = 8;
const K: usize = 2;
const H: usize = 512;

/// Deterministic pseudo-random floats in [-1, 1) (xorshift), so runs are comparable.
fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32) / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let logits = floats(T * E, 1);
    let x = floats(T * D, 2);
    let opts = RouteOptions {
        k: K,
        score: Score::Softmax,
        n_groups: None,
        topk_groups: None,
        normalize: true,
    };
    let lm = Matrix::new("logits", &logits, T, E).unwrap();
    c.bench_function("route/softmax_top2", |b| {
        b.iter(|| route(black_box(lm), None, &opts).unwrap())
    });
    let routing = route(lm, None, &opts).unwrap();
    let idx = Matrix::new("expert_idx", &routing.expert_idx, T, K).unwrap();
    let wts = Matrix::new("weights", &routing.weights, T, K).unwrap();
    let xm = Matrix::new("x", &x, T, D).unwrap();
    let popts = PermuteOptions {
        n_experts: E,
        capacity: None,
        weights: None,
        pad_to: 1,
    };
    c.bench_function("permute", |b| {
        b.iter(|| permute(black_box(xm), idx, &popts).unwrap())
    });
    let p = permute(xm, idx, &popts).unwrap();
    let r = p.rows();
    let ys = Matrix::new("y_sorted", &p.x_sorted, r, D).unwrap();
    c.bench_function("unpermute", |b| {
        b.iter(|| unpermute(black_box(ys), &p.order, Some(wts), T, K).unwrap())
    });
    let dy = floats(T * D, 3);
    let dym = Matrix::new("dy", &dy, T, D).unwrap();
    c.bench_function("unpermute_backward", |b| {
        b.iter(|| unpermute_backward(black_box(dym), ys, &p.order, wts).unwrap())
    });

    let w1 = floats(E * D * H, 4);
    let ws = MatrixStack::new("w", &w1, E, D, H).unwrap();
    let mut g = c.benchmark_group("grouped_matmul");
    g.sample_size(30);
    g.bench_function("forward", |b| {
        b.iter(|| grouped_matmul(black_box(ys), &p.counts, ws).unwrap())
    });
    g.bench_function("forward_experts_side_by_side", |b| {
        b.iter(|| side_by_side_forward(black_box(&p.x_sorted), &p.counts, &w1))
    });
    let h = grouped_matmul(ys, &p.counts, ws).unwrap();
    let hm = Matrix::new("dy", &h, r, H).unwrap();
    g.bench_function("dx", |b| {
        b.iter(|| grouped_matmul_dx(black_box(hm), &p.counts, ws).unwrap())
    });
    g.bench_function("dw", |b| {
        b.iter(|| grouped_matmul_dw(black_box(ys), hm, &p.counts).unwrap())
    });
    g.finish();
}

/// The schedule we did not take: every expert at once on rayon's threads, one thread each.
fn side_by_side_forward(x: &[f32], counts: &[i32], w: &[f32]) -> Vec<f32> {
    let rows: usize = counts.iter().map(|&c| c as usize).sum();
    let mut out = vec![0.0f32; rows * H];
    let mut pieces = Vec::new();
    let (mut rest, mut row) = (&mut out[..], 0);
    for (e, &c) in counts.iter().enumerate() {
        let c = c as usize;
        let (piece, tail) = rest.split_at_mut(c * H);
        pieces.push((e, row, c, piece));
        rest = tail;
        row += c;
    }
    pieces.into_par_iter().for_each(|(e, row, c, piece)| {
        // SAFETY: x has rows·D elements, w has E·D·H and `piece` is this expert's c·H block of
        // the output; the expert's rows [row, row + c) are inside x, and piece aliases neither.
        unsafe {
            gemm::gemm(
                c,
                H,
                D,
                piece.as_mut_ptr(),
                1,
                H as isize,
                false,
                x[row * D..].as_ptr(),
                1,
                D as isize,
                w[e * D * H..].as_ptr(),
                1,
                H as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    out
}

criterion_group!(moe, benches);
criterion_main!(moe);
