//! Criterion benches of the top-k compressor's hot paths on a 10⁶-element gradient:
//! selection (exact, sampled), the fused error-feedback step, encode, decode and the sum of
//! eight payloads. `python benches/py/topk.py` compares against numpy / PyTorch.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use _core::compress::{
    compress_topk, decompress_sum, quantize_int8, select_topk, Encoding, Feedback, Method,
    Rounding, ValueFormat,
};

const N: usize = 1_000_000;

/// A deterministic bell-shaped gradient (sum of four hashed uniforms).
fn gradient(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n).map(|_| next() + next() + next() + next()).collect()
}

fn bench_select(c: &mut Criterion) {
    let g = gradient(N, 1);
    let mut group = c.benchmark_group("select");
    group.throughput(Throughput::Bytes((N * 4) as u64));
    for ratio in [0.001, 0.01] {
        let k = (N as f64 * ratio) as usize;
        group.bench_with_input(BenchmarkId::new("exact", ratio), &k, |b, &k| {
            b.iter(|| select_topk(black_box(&g), k, Method::Exact))
        });
        let sampled = Method::Sampled {
            seed: 0,
            exact_k: true,
        };
        group.bench_with_input(BenchmarkId::new("sampled", ratio), &k, |b, &k| {
            b.iter(|| select_topk(black_box(&g), k, sampled))
        });
    }
    group.finish();
}

fn bench_compress(c: &mut Criterion) {
    let g = gradient(N, 2);
    let k = N / 100;
    let enc = Encoding {
        index: None,
        values: ValueFormat::F16,
        chunk: 0,
    };
    let method = Method::Sampled {
        seed: 0,
        exact_k: true,
    };
    let mut group = c.benchmark_group("compress");
    group.throughput(Throughput::Bytes((N * 4) as u64));
    group.bench_function("sampled_f16", |b| {
        b.iter(|| compress_topk(black_box(&g), Feedback::None, k, method, &enc))
    });
    let mut residual = vec![0f32; N];
    group.bench_function("sampled_f16_error_feedback", |b| {
        b.iter(|| {
            compress_topk(
                black_box(&g),
                Feedback::Residual(&mut residual),
                k,
                method,
                &enc,
            )
        })
    });
    group.bench_function("int8_dense", |b| {
        b.iter(|| quantize_int8(black_box(&g), 256, Rounding::Nearest))
    });
    group.finish();
}

fn bench_decompress_sum(c: &mut Criterion) {
    let k = N / 100;
    let enc = Encoding {
        index: None,
        values: ValueFormat::F16,
        chunk: 0,
    };
    let method = Method::Sampled {
        seed: 0,
        exact_k: true,
    };
    let payloads: Vec<Vec<u8>> = (0..8)
        .map(|r| compress_topk(&gradient(N, 10 + r), Feedback::None, k, method, &enc))
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    let views: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let mut out = vec![0f32; N];
    let mut group = c.benchmark_group("decompress");
    group.throughput(Throughput::Bytes((N * 4) as u64));
    group.bench_function("sum_of_8", |b| {
        b.iter(|| decompress_sum(black_box(&views), &mut out, 0.125))
    });
    group.finish();
}

criterion_group!(benches, bench_select, bench_compress, bench_decompress_sum);
criterion_main!(benches);
