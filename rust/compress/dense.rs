//! The dense writers: decompress a payload into an array (overwrite or add) and add many
//! payloads into one (the all-gather path), in parallel over the output. Nothing is written
//! until every payload involved has been fully validated.

use rayon::prelude::*;

use super::decode::{decode, Decoded};
use super::{corrupt, CompressError};

/// Output elements per parallel task: 64 KiB of f32, so a task's slice of the output stays in
/// cache while every payload adds into it.
const OUT_TASK: usize = 1 << 14;

/// How [`decompress_into`] writes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Write {
    /// `out = dense(payload)` (zeros where nothing was sent).
    Overwrite,
    /// `out += scale · dense(payload)`.
    Add(f32),
}

fn check_out_len(d: &Decoded<'_>, out: &[f32]) -> Result<(), CompressError> {
    if d.n() != out.len() {
        return Err(corrupt(format!(
            "payload is for n = {} elements, the output has {}",
            d.n(),
            out.len()
        )));
    }
    Ok(())
}

/// Reads one value per cache line of `dst`, in order: a pattern the hardware prefetcher
/// follows, so the scattered adds that come next hit the cache instead of stalling.
fn touch(dst: &[f32]) {
    let mut sum = 0f32;
    for &x in dst.iter().step_by(16) {
        sum += x;
    }
    std::hint::black_box(sum);
}

/// Decodes `bytes` into `out` (overwriting or adding), in parallel over `out`.
pub fn decompress_into(bytes: &[u8], out: &mut [f32], how: Write) -> Result<(), CompressError> {
    let d = decode(bytes)?;
    check_out_len(&d, out)?;
    let write = |t: usize, dst: &mut [f32]| match how {
        Write::Overwrite => {
            dst.fill(0.0);
            d.add_range(t * OUT_TASK, dst, 1.0);
        }
        Write::Add(scale) => d.add_range(t * OUT_TASK, dst, scale),
    };
    if out.len() <= OUT_TASK * 4 {
        out.chunks_mut(OUT_TASK)
            .enumerate()
            .for_each(|(t, dst)| write(t, dst));
    } else {
        out.par_chunks_mut(OUT_TASK)
            .enumerate()
            .for_each(|(t, dst)| write(t, dst));
    }
    Ok(())
}

/// `out += scale · Σ dense(payloadᵢ)`. Every payload is validated (in parallel) before `out`
/// is touched; then each task adds every payload's share of its slice of `out`, in payload
/// order, so the result does not depend on the number of threads.
pub fn decompress_sum(
    payloads: &[&[u8]],
    out: &mut [f32],
    scale: f32,
) -> Result<(), CompressError> {
    sum_into(payloads, out, scale, false)
}

/// `out = scale · Σ dense(payloadᵢ)`: [`decompress_sum`] into an output whose old contents
/// do not matter. Each task zeroes its slice of `out` just before adding into it, so the
/// output is written in one pass instead of a zeroing pass, a prefetch pass and the adds.
pub fn decompress_sum_overwrite(
    payloads: &[&[u8]],
    out: &mut [f32],
    scale: f32,
) -> Result<(), CompressError> {
    sum_into(payloads, out, scale, true)
}

fn sum_into(
    payloads: &[&[u8]],
    out: &mut [f32],
    scale: f32,
    overwrite: bool,
) -> Result<(), CompressError> {
    let decoded: Vec<Decoded<'_>> = payloads
        .par_iter()
        .enumerate()
        .map(|(i, p)| {
            let d = decode(p).map_err(|e| match e {
                CompressError::Corrupt(m) => corrupt(format!("payload {i}: {m}")),
                other => other,
            })?;
            check_out_len(&d, out).map_err(|e| match e {
                CompressError::Corrupt(m) => corrupt(format!("payload {i}: {m}")),
                other => other,
            })?;
            Ok(d)
        })
        .collect::<Result<_, CompressError>>()?;
    let add_all = |t: usize, dst: &mut [f32]| {
        if overwrite {
            dst.fill(0.0); // and now in cache for the adds
        } else {
            touch(dst);
        }
        for d in &decoded {
            d.add_range(t * OUT_TASK, dst, scale);
        }
    };
    if out.len() <= OUT_TASK * 4 {
        out.chunks_mut(OUT_TASK)
            .enumerate()
            .for_each(|(t, dst)| add_all(t, dst));
    } else {
        out.par_chunks_mut(OUT_TASK)
            .enumerate()
            .for_each(|(t, dst)| add_all(t, dst));
    }
    Ok(())
}
