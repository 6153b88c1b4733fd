//! When and how to split a kernel's rows over rayon's threads.
//!
//! Rayon runs work submitted from a foreign thread (Python's) on its pool while the caller
//! waits, so each parallel call pays a wake-up: small inputs stay on the calling thread.

use rayon::prelude::*;

/// Bytes a compute-bound kernel (routing: exponentials, top-k) must touch before splitting it
/// over threads. At the benchmark shape (4096 × 8 logits, 512 KiB touched, ~0.3 ms) a second
/// thread measured between 1.2x faster and 1.5x slower depending on the machine's load, so
/// routing goes parallel only from twice that size.
///
/// Unit tests use tiny thresholds so their small inputs go through the split code paths too.
pub(crate) const COMPUTE_BOUND: usize = if cfg!(test) { 64 } else { 1024 * 1024 };

/// Bytes a memory-bound kernel (the row gathers of permute / unpermute) must move before a
/// second thread pays. Measured on the 2-core machine this was tuned on, at the benchmark
/// shape (12 MiB moved): a second thread gained at most ~10% when the machine was idle and
/// cost up to 2x when it was busy (rayon waits for a descheduled worker), so gathers stay on
/// the calling thread below this (tiny in unit tests, as above).
pub(crate) const MEMORY_BOUND: usize = if cfg!(test) { 64 } else { 64 * 1024 * 1024 };

/// Blocks per thread, so a slow (or descheduled) thread can be covered by the others.
const BLOCKS_PER_THREAD: usize = 4;

/// How many rows each block gets when `rows` rows of `row_bytes` bytes each are processed:
/// all of them (one block, run on the calling thread) when the job touches fewer than
/// `min_bytes` bytes ([`COMPUTE_BOUND`] or [`MEMORY_BOUND`]).
pub(crate) fn rows_per_block(rows: usize, row_bytes: usize, min_bytes: usize) -> usize {
    let threads = rayon::current_num_threads();
    if threads <= 1 || rows.saturating_mul(row_bytes) < min_bytes {
        return rows.max(1);
    }
    let min_rows = (COMPUTE_BOUND / 8 / row_bytes.max(1)).max(1);
    rows.div_ceil(threads * BLOCKS_PER_THREAD).max(min_rows)
}

/// Calls `body(block_index, item)` for every item: on rayon's threads if there is more than
/// one item, else on the calling thread.
pub(crate) fn run<I: Send>(items: Vec<I>, body: impl Fn(usize, I) + Sync + Send) {
    if items.len() > 1 {
        items
            .into_par_iter()
            .enumerate()
            .for_each(|(i, item)| body(i, item));
    } else {
        items
            .into_iter()
            .enumerate()
            .for_each(|(i, item)| body(i, item));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_jobs_are_one_block_and_large_ones_split() {
        let big = 64 << 20;
        assert_eq!(rows_per_block(0, 1024, big), 1);
        assert_eq!(rows_per_block(10, 1024, big), 10);
        assert_eq!(rows_per_block(8192, 1024, big), 8192);
        let rows = 8192;
        let per = rows_per_block(rows, 1024, 1024);
        if rayon::current_num_threads() > 1 {
            assert!(per < rows && per >= 1);
        } else {
            assert_eq!(per, rows);
        }
    }

    #[test]
    fn run_visits_every_item_once() {
        let mut v = vec![0u32; 100];
        let items: Vec<&mut [u32]> = v.chunks_mut(7).collect();
        run(items, |i, chunk| {
            chunk.iter_mut().for_each(|x| *x += i as u32 + 1)
        });
        for (i, x) in v.iter().enumerate() {
            assert_eq!(*x, (i / 7) as u32 + 1);
        }
    }
}
