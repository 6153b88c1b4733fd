//! The dense 8-bit quantizer: every element sent as an int8 code with one f32 scale per chunk
//! (index encoding "dense", value encoding "int8"), parallel over chunks.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::codec::{
    quantize_chunk, Header, IndexFormat, Rounding, ValueFormat, HEADER_LEN, MAX_CHUNK, TRAILER_LEN,
};
use super::scan::first_nonfinite;
use super::{CompressError, MAX_N};

/// Chunks per parallel task (at least this many elements' worth of work).
const MIN_TASK_ELEMENTS: usize = 1 << 16;

/// Quantizes all of `x` to an int8 payload with one scale per `chunk` elements.
pub fn quantize_int8(x: &[f32], chunk: u32, rounding: Rounding) -> Result<Vec<u8>, CompressError> {
    let n = x.len();
    if n > MAX_N {
        return Err(CompressError::BadK { k: n, n });
    }
    if !(1..=MAX_CHUNK).contains(&chunk) {
        return Err(CompressError::InvalidArgument(format!(
            "chunk must be in 1..={MAX_CHUNK}, got {chunk}"
        )));
    }
    let header = Header {
        index: IndexFormat::Dense,
        values: ValueFormat::Int8,
        n: n as u64,
        k: n as u64,
        index_bytes: 0,
        chunk,
    };
    let total = header
        .total_len()
        .and_then(|t| usize::try_from(t).ok())
        .ok_or(CompressError::BadK { k: n, n })?;
    let mut out = vec![0u8; total];
    header.write(&mut out[..HEADER_LEN]);
    let body_end = total - TRAILER_LEN;
    let chunk = chunk as usize;
    let (scales, codes) = out[HEADER_LEN..body_end].split_at_mut(4 * n.div_ceil(chunk));
    let per_task = MIN_TASK_ELEMENTS.div_ceil(chunk).max(1);
    // NaN/±inf is found while quantizing (by the chunk's max); the payload is then dropped.
    let bad = AtomicBool::new(false);
    let task = |t: usize, (scales, codes): (&mut [u8], &mut [u8]), x: &[f32]| {
        for (c, ((vals, codes), scale_out)) in x
            .chunks(chunk)
            .zip(codes.chunks_mut(chunk))
            .zip(scales.chunks_exact_mut(4))
            .enumerate()
        {
            let first = ((t * per_task + c) * chunk) as u64;
            let Some(scale) = quantize_chunk(vals, codes, rounding, first) else {
                bad.store(true, Ordering::Relaxed);
                return;
            };
            scale_out.copy_from_slice(&scale.to_le_bytes());
        }
    };
    if n <= MIN_TASK_ELEMENTS {
        task(0, (scales, codes), x);
    } else {
        scales
            .par_chunks_mut(4 * per_task)
            .zip(codes.par_chunks_mut(chunk * per_task))
            .zip(x.par_chunks(chunk * per_task))
            .enumerate()
            .for_each(|(t, (pair, x))| task(t, pair, x));
    }
    if bad.load(Ordering::Relaxed) {
        let index = first_nonfinite(x).unwrap_or(0);
        return Err(CompressError::NonFinite {
            what: "gradient",
            index,
            value: x.get(index).copied().unwrap_or(f32::NAN),
        });
    }
    let crc = crc32c::crc32c(&out[..body_end]);
    out[body_end..].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::decode::decode;
    use super::super::dense::{decompress_into, Write};
    use super::*;

    #[test]
    fn dense_int8_round_trips_within_half_a_step() {
        let n: usize = 300_001; // several parallel tasks and a short last chunk
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
            .collect();
        for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 9 }] {
            let p = quantize_int8(&x, 256, rounding).unwrap();
            assert_eq!(p.len(), 44 + n + 4 * n.div_ceil(256));
            let mut out = vec![0f32; n];
            decompress_into(&p, &mut out, Write::Overwrite).unwrap();
            for (c, (xs, os)) in x.chunks(256).zip(out.chunks(256)).enumerate() {
                let step = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let bound = if rounding == Rounding::Nearest {
                    0.5
                } else {
                    1.0
                } * step
                    * 1.001;
                for (a, b) in xs.iter().zip(os) {
                    assert!((a - b).abs() <= bound, "chunk {c}: {a} vs {b}");
                }
            }
            let d = decode(&p).unwrap();
            assert_eq!((d.n(), d.k()), (n, n));
        }
        // equal seeds, equal payloads; the parallel split does not matter
        let a = quantize_int8(&x, 100, Rounding::Stochastic { seed: 1 }).unwrap();
        let b = quantize_int8(&x, 100, Rounding::Stochastic { seed: 1 }).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_input_is_rejected() {
        assert!(quantize_int8(&[1.0, f32::INFINITY], 4, Rounding::Nearest).is_err());
        assert!(quantize_int8(&[1.0], 0, Rounding::Nearest).is_err());
        let p = quantize_int8(&[], 4, Rounding::Nearest).unwrap();
        assert_eq!(decode(&p).unwrap().n(), 0);
        let tiny = quantize_int8(&[1e-42, -1e-44, 0.0], 4, Rounding::Nearest).unwrap();
        assert!(decode(&tiny).is_ok());
    }
}
