//! Mutation fuzzing of the decoder: well over 10⁵ mutated payloads, each decoded and written.
//! Raw mutations (bit flips, truncation, extension, overwritten bytes) must be rejected as
//! `Corrupt`; mutations resealed with a fresh checksum exercise the content checks and may
//! decode, but must never panic nor produce anything but `Corrupt`.

use super::codec::{encode, Encoding, IndexFormat, Rounding, ValueFormat};
use super::decode::decode;
use super::dense::{decompress_into, decompress_sum, Write};
use super::quant::quantize_int8;
use super::rng::mix64;
use super::CompressError;

fn seeds() -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    for (t, n) in [1usize, 9, 64, 257, 1000].into_iter().enumerate() {
        let ix: Vec<u32> = (0..n as u32)
            .filter(|i| mix64(u64::from(*i) ^ t as u64).is_multiple_of(5))
            .collect();
        let vals: Vec<f32> = ix.iter().map(|&i| (i as f32 - 100.0) * 0.37).collect();
        for index in [IndexFormat::Varint, IndexFormat::Bitmap, IndexFormat::Raw] {
            for values in [
                ValueFormat::F32,
                ValueFormat::F16,
                ValueFormat::Bf16,
                ValueFormat::Int8,
            ] {
                let e = Encoding {
                    index: Some(index),
                    values,
                    chunk: 3,
                };
                if let Ok(p) = encode(n, &ix, &vals, &e, Rounding::Nearest, None) {
                    out.push((n, p));
                }
            }
        }
        let dense: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
        if let Ok(p) = quantize_int8(&dense, 16, Rounding::Nearest) {
            out.push((n, p));
        }
    }
    out
}

fn reseal(p: &mut [u8]) {
    if p.len() >= 4 {
        let end = p.len() - 4;
        let crc = crc32c::crc32c(&p[..end]);
        p[end..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Decodes and writes `p` (and, when `sum`, sums it twice); returns whether it was accepted.
fn exercise(p: &[u8], n: usize, sum: bool) -> bool {
    let verdict = decode(p).map(|d| d.n());
    let mut out = vec![0f32; n];
    let into = decompress_into(p, &mut out, Write::Add(1.0));
    let summed = if sum {
        decompress_sum(&[p, p], &mut out, 0.5)
    } else {
        Ok(())
    };
    for r in [
        verdict.as_ref().err(),
        into.as_ref().err(),
        summed.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    {
        assert!(matches!(r, CompressError::Corrupt(_)), "{r:?}");
    }
    verdict.is_ok()
}

#[test]
fn hundred_thousand_mutations_only_ever_corrupt() {
    let seeds = seeds();
    assert!(seeds.len() >= 60);
    let mut raw_rejected = 0usize;
    let mut resealed_accepted = 0usize;
    let mut total = 0usize;
    for round in 0..1700u64 {
        for (s, (n, base)) in seeds.iter().enumerate() {
            let r = mix64(round * 1000 + s as u64);
            let mut p = base.clone();
            let len = p.len();
            let at = (r >> 8) as usize % len;
            let resealed = match r % 8 {
                0 => {
                    p[at] ^= 1 << ((r >> 40) % 8);
                    false
                }
                1 => {
                    p.truncate(at);
                    false
                }
                2 => {
                    p.extend_from_slice(&r.to_le_bytes()[..1 + (r >> 50) as usize % 8]);
                    false
                }
                3 => {
                    p[at] = p[at].wrapping_add(1 + (r >> 32) as u8 % 255);
                    false
                }
                4 => {
                    // header field, resealed: version, encodings, n, k, index bytes, chunk
                    let field = [
                        4usize, 5, 6, 7, 8, 9, 12, 16, 17, 20, 24, 25, 28, 32, 33, 36,
                    ][(r >> 20) as usize % 16];
                    p[field] = (r >> 32) as u8;
                    reseal(&mut p);
                    true
                }
                5 | 6 => {
                    // body byte, resealed: the content checks must hold the line
                    let body = 40 + (r >> 8) as usize % (len - 44).max(1);
                    if body < len - 4 {
                        p[body] = (r >> 32) as u8;
                    }
                    reseal(&mut p);
                    true
                }
                _ => {
                    // random bytes behind a valid magic
                    let m = (r >> 16) as usize % 120;
                    p = (0..m as u64).map(|i| mix64(r ^ i) as u8).collect();
                    if p.len() >= 4 {
                        p[..4].copy_from_slice(b"MoEC");
                    }
                    false
                }
            };
            let accepted = exercise(&p, *n, round % 8 == 0);
            total += 1;
            if resealed {
                resealed_accepted += usize::from(accepted);
            } else {
                assert!(
                    !accepted || p == *base,
                    "raw mutation {} of seed {s} accepted",
                    r % 8
                );
                raw_rejected += usize::from(!accepted);
            }
        }
    }
    assert!(total >= 100_000, "{total}");
    assert!(raw_rejected > total / 2);
    // Some resealed value changes stay valid payloads: the checks are not rejecting blindly.
    assert!(resealed_accepted > 0);
}
