//! Criterion benchmarks of the memory pool.
//!
//! - `alloc_free_pair/<size>`: one `malloc` + `free` of the same size on a warm host pool,
//!   against the global allocator (`std::alloc`, 512 B aligned) as the baseline.
//! - `random_allocations/<backing>/<n>`: RMM's random workload (73 % allocate / 27 % free a
//!   random live block, sizes 1 KiB…64 MiB, live bytes capped at 16000 MiB, as in RMM's
//!   `random_allocations` benchmark) on a warm pool. `host` obtains real (untouched) memory;
//!   `simulated` measures the bookkeeping alone.
//! - `index/<kind>/<n>`: the free-block index alone, TLSF against an ordered set keyed by
//!   (size, block) (what an index ordered by (stream, size, address) is within one stream):
//!   each step takes the best fit for a random request out and puts the block back with
//!   another random size, with `n` free blocks indexed.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use _core::pool::index::{Block, Tlsf};
use _core::pool::{random_trace, Pool, Simulated, SplitMix64, TraceEvent};

const SIZES: [usize; 8] = [
    512,
    4 << 10,
    64 << 10,
    512 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
];

fn label(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{}MiB", s >> 20),
        s if s >= 1 << 10 => format!("{}KiB", s >> 10),
        s => format!("{s}B"),
    }
}

fn alloc_free_pair(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_free_pair");
    for size in SIZES {
        let mut pool = Pool::host(None);
        // Warm: the first request obtains the segment; the measured ones reuse it.
        let a = pool.malloc(size, 0).expect("warm-up allocation");
        pool.free(a).expect("warm-up free");
        g.bench_function(BenchmarkId::new("pool", label(size)), |b| {
            b.iter(|| {
                let a = pool.malloc(black_box(size), 0).expect("malloc");
                pool.free(black_box(a)).expect("free");
            })
        });
        let layout = Layout::from_size_align(size, 512).expect("layout");
        g.bench_function(BenchmarkId::new("std_alloc", label(size)), |b| {
            b.iter(|| {
                // SAFETY: the layout has a non-zero size; the pointer is freed with the same
                // layout right away and never dereferenced.
                unsafe {
                    let p = alloc(layout);
                    assert!(!p.is_null());
                    dealloc(black_box(p), layout);
                }
            })
        });
    }
    g.finish();
}

/// Runs a trace whose ids are dense (`random_trace` numbers them 0..n) with a plain vector
/// for the id → address map, so the measurement is the pool's.
fn run_trace(pool: &mut Pool, trace: &[TraceEvent], addrs: &mut [usize]) {
    for ev in trace {
        match *ev {
            TraceEvent::Alloc { id, size, stream } => {
                addrs[id as usize] = pool.malloc(size, stream).expect("malloc");
            }
            TraceEvent::Free { id } => pool.free(addrs[id as usize]).expect("free"),
        }
    }
}

fn random_allocations(c: &mut Criterion) {
    let mut g = c.benchmark_group("random_allocations");
    g.sample_size(10);
    for n in [10_000usize, 100_000] {
        let trace = random_trace(n, 1 << 10, 64 << 20, 16000 << 20, 42);
        g.throughput(Throughput::Elements(trace.len() as u64));
        let mut addrs = vec![0usize; n];
        for (name, mut pool) in [
            ("host", Pool::host(None)),
            ("simulated", Pool::new(Box::new(Simulated::new()), None)),
        ] {
            run_trace(&mut pool, &trace, &mut addrs); // warm the cache
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| run_trace(&mut pool, black_box(&trace), &mut addrs))
            });
        }
    }
    g.finish();
}

fn index(c: &mut Criterion) {
    let mut g = c.benchmark_group("index");
    for n in [1_000usize, 100_000] {
        let mut rng = SplitMix64::new(n as u64);
        let granules = |rng: &mut SplitMix64, hi: u64| rng.range(1, hi) as usize * 512;
        let sizes: Vec<usize> = (0..n).map(|_| granules(&mut rng, 4096)).collect();
        let requests: Vec<usize> = (0..4096).map(|_| granules(&mut rng, 2048)).collect();
        let returns: Vec<usize> = (0..4096).map(|_| granules(&mut rng, 4096)).collect();

        let mut blocks: Vec<Block> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| Block::free(i << 22, s))
            .collect();
        let mut tlsf = Tlsf::default();
        for i in 0..n {
            tlsf.insert(&mut blocks, i as u32);
        }
        let mut k = 0usize;
        g.bench_function(BenchmarkId::new("tlsf", n), |b| {
            b.iter(|| {
                k = k.wrapping_add(1);
                if let Some(i) = tlsf.find(&blocks, black_box(requests[k & 4095])) {
                    tlsf.remove(&mut blocks, i);
                    blocks[i as usize].size = returns[k & 4095];
                    tlsf.insert(&mut blocks, i);
                }
            })
        });

        let mut set: BTreeSet<(usize, u32)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, i as u32))
            .collect();
        let mut k = 0usize;
        g.bench_function(BenchmarkId::new("ordered_set", n), |b| {
            b.iter(|| {
                k = k.wrapping_add(1);
                let req = black_box(requests[k & 4095]);
                if let Some(&(s, i)) = set.range((req, 0)..).next() {
                    set.remove(&(s, i));
                    set.insert((returns[k & 4095], i));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, alloc_free_pair, random_allocations, index);
criterion_main!(benches);
