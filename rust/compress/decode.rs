//! The validating decoder: header, checksum and contents are checked before anything is
//! written or allocated beyond what the payload's own length bounds.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::codec::{
    Header, IndexFormat, ValueFormat, HEADER_LEN, MAGIC, MAX_CHUNK, TRAILER_LEN, VERSION,
};
use super::{corrupt, CompressError, MAX_N};

/// Int8 codes checked on one thread below this many bytes, in parallel above.
const PAR_CHECK: usize = 1 << 17;

/// A fully validated payload.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub header: Header,
    /// Increasing indices; `None` for a dense payload (value j belongs to element j).
    indices: Option<Vec<u32>>,
    values: Values<'a>,
}

#[derive(Debug)]
enum Values<'a> {
    Floats(Vec<f32>),
    /// Dense int8 stays as codes and is dequantized while writing (k = n can be large).
    Int8 {
        codes: &'a [u8],
        scales: Vec<f32>,
        chunk: usize,
    },
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Validates the header and that the payload has exactly the length it describes (not the
/// checksum nor the contents).
pub fn parse_header(bytes: &[u8]) -> Result<Header, CompressError> {
    let min = HEADER_LEN + TRAILER_LEN;
    if bytes.len() >= 4 && bytes[..4] != MAGIC {
        return Err(corrupt(format!(
            "not a moecore payload: magic {:02x?} is not {:02x?} (\"MoEC\")",
            &bytes[..4],
            MAGIC
        )));
    }
    if bytes.len() < min {
        return Err(corrupt(format!(
            "truncated: {} bytes, shorter than the {min}-byte header and checksum",
            bytes.len()
        )));
    }
    if bytes[4] != VERSION {
        return Err(corrupt(format!(
            "unsupported format version {} (this build reads version {VERSION})",
            bytes[4]
        )));
    }
    let index = IndexFormat::from_code(bytes[5])
        .ok_or_else(|| corrupt(format!("unknown index encoding code {}", bytes[5])))?;
    let values = ValueFormat::from_code(bytes[6])
        .ok_or_else(|| corrupt(format!("unknown value encoding code {}", bytes[6])))?;
    if bytes[7] != 0 || bytes[36..40] != [0; 4] {
        return Err(corrupt("reserved header bytes are not zero"));
    }
    let header = Header {
        index,
        values,
        n: le_u64(bytes, 8),
        k: le_u64(bytes, 16),
        index_bytes: le_u64(bytes, 24),
        chunk: le_u32(bytes, 32),
    };
    let (n, k, ib) = (header.n, header.k, header.index_bytes);
    if n > MAX_N as u64 {
        return Err(corrupt(format!(
            "n = {n} is larger than the format allows ({MAX_N})"
        )));
    }
    if k > n {
        return Err(corrupt(format!("k = {k} exceeds n = {n}")));
    }
    match values {
        ValueFormat::Int8 if !(1..=MAX_CHUNK).contains(&header.chunk) => {
            return Err(corrupt(format!(
                "int8 chunk length {} is not in 1..={MAX_CHUNK}",
                header.chunk
            )))
        }
        ValueFormat::F32 | ValueFormat::F16 | ValueFormat::Bf16 if header.chunk != 0 => {
            return Err(corrupt(format!(
                "chunk length {} given for {} values (must be 0)",
                header.chunk,
                values.name()
            )))
        }
        _ => {}
    }
    let index_ok = match index {
        IndexFormat::Varint => k <= ib && ib <= 5 * k,
        IndexFormat::Bitmap => ib == n.div_ceil(8),
        IndexFormat::Raw => ib == 4 * k,
        IndexFormat::Dense => ib == 0 && k == n,
    };
    if !index_ok {
        return Err(corrupt(format!(
            "{} index section of {ib} bytes is inconsistent with n = {n}, k = {k}",
            index.name()
        )));
    }
    let total = header
        .total_len()
        .ok_or_else(|| corrupt("header sizes overflow"))?;
    let len = bytes.len() as u64;
    if len < total {
        return Err(corrupt(format!(
            "truncated: header describes {total} bytes, got {len}"
        )));
    }
    if len > total {
        return Err(corrupt(format!(
            "oversized: {len} bytes, header describes {total} ({} trailing bytes)",
            len - total
        )));
    }
    Ok(header)
}

/// Validates everything (header, length, CRC32C, contents) and decodes the payload.
pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>, CompressError> {
    let header = parse_header(bytes)?;
    let body_end = bytes.len() - TRAILER_LEN;
    let stored = le_u32(bytes, body_end);
    let computed = crc32c::crc32c(&bytes[..body_end]);
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x} \
             (corrupted or truncated in transit)"
        )));
    }
    // Lengths are consistent with `bytes.len()` (parse_header), so these fit in usize.
    let (n, k) = (header.n as usize, header.k as usize);
    let (index_section, value_section) =
        bytes[HEADER_LEN..body_end].split_at(header.index_bytes as usize);
    let indices = match header.index {
        IndexFormat::Varint => Some(read_varint(index_section, k, n)?),
        IndexFormat::Bitmap => Some(read_bitmap(index_section, k, n)?),
        IndexFormat::Raw => Some(read_raw(index_section, k, n)?),
        IndexFormat::Dense => None,
    };
    let values = read_values(&header, value_section, indices.is_none())?;
    Ok(Decoded {
        header,
        indices,
        values,
    })
}

fn read_varint(sec: &[u8], k: usize, n: usize) -> Result<Vec<u32>, CompressError> {
    let mut out = Vec::with_capacity(k); // k ≤ sec.len(), checked by parse_header
    let mut at = 0usize;
    let mut next = 0u64; // smallest index the next entry may have
    for j in 0..k {
        let (gap, len) = if at + 8 <= sec.len() {
            varint_fast(&sec[at..at + 8])
        } else {
            varint_slow(&sec[at..])
        }
        .map_err(|what| corrupt(format!("varint entry {j} of {k} {what}")))?;
        at += len;
        let index = next + gap;
        if index >= n as u64 {
            return Err(corrupt(format!(
                "index {index} (entry {j}) is out of range for n = {n}"
            )));
        }
        out.push(index as u32);
        next = index + 1;
    }
    if at != sec.len() {
        return Err(corrupt(format!(
            "varint index section has {} bytes after its {k} entries",
            sec.len() - at
        )));
    }
    Ok(out)
}

/// One LEB128 value from a full 8-byte window, without data-dependent branches on the
/// common path: (value, length) or what is wrong.
#[inline]
fn varint_fast(window: &[u8]) -> Result<(u64, usize), &'static str> {
    let mut w = [0u8; 8];
    w.copy_from_slice(window);
    let w = u64::from_le_bytes(w);
    let stops = !w & 0x80_8080_8080;
    if stops == 0 {
        return Err("does not fit in 32 bits");
    }
    let len = (stops.trailing_zeros() / 8 + 1) as usize;
    let data = w & (u64::MAX >> (64 - 8 * len));
    let last = data >> (8 * (len - 1));
    if (len > 1 && last == 0) || (len == 5 && last > 0x0f) {
        return Err(if last == 0 {
            "is not minimally encoded"
        } else {
            "does not fit in 32 bits"
        });
    }
    let v = (data & 0x7f)
        | ((data >> 8) & 0x7f) << 7
        | ((data >> 16) & 0x7f) << 14
        | ((data >> 24) & 0x7f) << 21
        | ((data >> 32) & 0x7f) << 28;
    Ok((v, len))
}

/// One LEB128 value from the last bytes of the section, byte by byte.
fn varint_slow(rest: &[u8]) -> Result<(u64, usize), &'static str> {
    let mut v = 0u64;
    for (i, &b) in rest.iter().enumerate().take(5) {
        if i == 4 && b > 0x0f {
            return Err("does not fit in 32 bits");
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err("is not minimally encoded");
            }
            return Ok((v, i + 1));
        }
    }
    Err(if rest.len() < 5 {
        "runs past the end of the index section"
    } else {
        "does not fit in 32 bits"
    })
}

fn read_bitmap(sec: &[u8], k: usize, n: usize) -> Result<Vec<u32>, CompressError> {
    if !n.is_multiple_of(8) {
        if let Some(&last) = sec.last() {
            if last >> (n % 8) != 0 {
                return Err(corrupt("bitmap has bits set beyond n"));
            }
        }
    }
    let set: u64 = sec.iter().map(|b| u64::from(b.count_ones())).sum();
    if set != k as u64 {
        return Err(corrupt(format!(
            "bitmap has {set} bits set, header says k = {k}"
        )));
    }
    let mut out = Vec::with_capacity(k);
    for (byte_at, &b) in sec.iter().enumerate() {
        let mut bits = b;
        while bits != 0 {
            out.push((byte_at * 8) as u32 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    Ok(out)
}

fn read_raw(sec: &[u8], k: usize, n: usize) -> Result<Vec<u32>, CompressError> {
    let mut out = Vec::with_capacity(k);
    let mut next = 0u64;
    for (j, w) in sec.chunks_exact(4).enumerate() {
        let index = le_u32(w, 0);
        if u64::from(index) < next {
            return Err(corrupt(format!(
                "raw indices are not strictly increasing at entry {j}"
            )));
        }
        if index as usize >= n {
            return Err(corrupt(format!(
                "index {index} (entry {j}) is out of range for n = {n}"
            )));
        }
        out.push(index);
        next = u64::from(index) + 1;
    }
    Ok(out)
}

fn read_values<'a>(
    header: &Header,
    sec: &'a [u8],
    dense: bool,
) -> Result<Values<'a>, CompressError> {
    let k = header.k as usize;
    let floats: Vec<f32> = match header.values {
        ValueFormat::F32 => sec
            .chunks_exact(4)
            .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect(),
        ValueFormat::F16 => {
            // Slice conversion uses F16C when the CPU has it; a small staging buffer turns the
            // unaligned little-endian bytes into halves first.
            let mut out = vec![0f32; k];
            let mut halves = [f16::ZERO; 1024];
            for (src, dst) in sec.chunks(2 * 1024).zip(out.chunks_mut(1024)) {
                let staged = &mut halves[..dst.len()];
                for (h, w) in staged.iter_mut().zip(src.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([w[0], w[1]]));
                }
                staged.convert_to_f32_slice(dst);
            }
            out
        }
        ValueFormat::Bf16 => sec
            .chunks_exact(2)
            .map(|w| f32::from_bits(u32::from(u16::from_le_bytes([w[0], w[1]])) << 16))
            .collect(),
        ValueFormat::Int8 => {
            let chunk = header.chunk as usize;
            let (scale_bytes, codes) = sec.split_at(4 * k.div_ceil(chunk));
            let scales: Vec<f32> = scale_bytes
                .chunks_exact(4)
                .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect();
            check_int8(&scales, codes, chunk)?;
            if dense {
                return Ok(Values::Int8 {
                    codes,
                    scales,
                    chunk,
                });
            }
            codes
                .chunks(chunk)
                .zip(&scales)
                .flat_map(|(c, &s)| c.iter().map(move |&q| f32::from(q as i8) * s))
                .collect()
        }
    };
    if let Some(j) = floats.iter().position(|v| !v.is_finite()) {
        return Err(corrupt(format!("value {j} is not finite ({})", floats[j])));
    }
    Ok(Values::Floats(floats))
}

fn check_int8(scales: &[f32], codes: &[u8], chunk: usize) -> Result<(), CompressError> {
    if let Some(c) = scales
        .iter()
        .position(|s| !s.is_finite() || s.is_sign_negative())
    {
        return Err(corrupt(format!(
            "int8 scale {c} is {} (must be finite and non-negative)",
            scales[c]
        )));
    }
    let bad = |c: usize, codes: &[u8], scale: f32| -> Option<String> {
        if codes.contains(&0x80) {
            return Some(format!("int8 chunk {c} has the unused code -128"));
        }
        if scale == 0.0 && codes.iter().any(|&q| q != 0) {
            return Some(format!(
                "int8 chunk {c} has a zero scale but non-zero codes"
            ));
        }
        None
    };
    let found = if codes.len() > PAR_CHECK {
        codes
            .par_chunks(chunk)
            .zip(scales.par_iter())
            .enumerate()
            .find_map_first(|(c, (codes, &s))| bad(c, codes, s))
    } else {
        codes
            .chunks(chunk)
            .zip(scales)
            .enumerate()
            .find_map(|(c, (codes, &s))| bad(c, codes, s))
    };
    found.map_or(Ok(()), |msg| Err(corrupt(msg)))
}

impl Decoded<'_> {
    pub fn n(&self) -> usize {
        self.header.n as usize
    }

    pub fn k(&self) -> usize {
        self.header.k as usize
    }

    /// The sent entries as (indices, values), increasing indices.
    pub fn to_sparse(&self) -> (Vec<u32>, Vec<f32>) {
        let indices = match &self.indices {
            Some(ix) => ix.clone(),
            None => (0..self.n() as u32).collect(),
        };
        let values = match &self.values {
            Values::Floats(v) => v.clone(),
            Values::Int8 { .. } => {
                let mut dense = vec![0f32; self.n()];
                self.add_range(0, &mut dense, 1.0);
                dense
            }
        };
        (indices, values)
    }

    /// `dst += scale · dense[lo .. lo + dst.len()]`.
    pub(crate) fn add_range(&self, lo: usize, dst: &mut [f32], scale: f32) {
        let hi = lo + dst.len();
        match (&self.indices, &self.values) {
            (Some(ix), Values::Floats(vals)) => {
                let a = ix.partition_point(|&i| (i as usize) < lo);
                let b = ix.partition_point(|&i| (i as usize) < hi);
                for (&i, &v) in ix[a..b].iter().zip(&vals[a..b]) {
                    dst[i as usize - lo] += scale * v;
                }
            }
            (None, Values::Floats(vals)) => {
                for (d, &v) in dst.iter_mut().zip(&vals[lo..hi]) {
                    *d += scale * v;
                }
            }
            (
                _,
                Values::Int8 {
                    codes,
                    scales,
                    chunk,
                },
            ) => {
                // Only dense payloads keep int8 codes (see read_values).
                let mut at = lo;
                while at < hi {
                    let c = at / chunk;
                    let end = ((c + 1) * chunk).min(hi);
                    let s = scale * scales[c];
                    for (d, &q) in dst[at - lo..end - lo].iter_mut().zip(&codes[at..end]) {
                        *d += s * f32::from(q as i8);
                    }
                    at = end;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::{encode, Encoding, Rounding, HEADER_LEN};
    use super::super::dense::{decompress_into, decompress_sum, decompress_sum_overwrite, Write};
    use super::*;
    use proptest::prelude::*;

    const INDEX: [IndexFormat; 3] = [IndexFormat::Varint, IndexFormat::Bitmap, IndexFormat::Raw];
    const VALUES: [ValueFormat; 4] = [
        ValueFormat::F32,
        ValueFormat::F16,
        ValueFormat::Bf16,
        ValueFormat::Int8,
    ];

    fn enc(index: Option<IndexFormat>, values: ValueFormat, chunk: u32) -> Encoding {
        Encoding {
            index,
            values,
            chunk,
        }
    }

    /// The documented size formula, written out independently of the encoder.
    fn formula(
        index: IndexFormat,
        values: ValueFormat,
        n: usize,
        ix: &[u32],
        chunk: usize,
    ) -> usize {
        let k = ix.len();
        let i = match index {
            IndexFormat::Varint => {
                let mut prev: i64 = -1;
                ix.iter()
                    .map(|&j| {
                        let d = (i64::from(j) - prev - 1) as u64;
                        prev = i64::from(j);
                        let bits = 64 - d.leading_zeros() as usize;
                        bits.div_ceil(7).max(1)
                    })
                    .sum()
            }
            IndexFormat::Bitmap => n.div_ceil(8),
            IndexFormat::Raw => 4 * k,
            IndexFormat::Dense => 0,
        };
        let v = match values {
            ValueFormat::F32 => 4 * k,
            ValueFormat::F16 | ValueFormat::Bf16 => 2 * k,
            ValueFormat::Int8 => k + 4 * k.div_ceil(chunk),
        };
        44 + i + v
    }

    fn tolerance(format: ValueFormat, v: f32, chunk_max: f32) -> f32 {
        match format {
            ValueFormat::F32 => 0.0,
            ValueFormat::F16 => v.abs() * 2f32.powi(-11) + 2f32.powi(-25),
            ValueFormat::Bf16 => v.abs() * 2f32.powi(-8),
            ValueFormat::Int8 => chunk_max / 127.0 * 0.5001,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn prop_round_trip_every_format(
            n in 1usize..2000,
            density in 0.0f64..1.0,
            seed in any::<u64>(),
            chunk in 1u32..70,
        ) {
            let mut ix = Vec::new();
            let mut vals = Vec::new();
            for i in 0..n as u32 {
                let h = super::super::rng::uniform(seed, u64::from(i));
                if f64::from(h) < density {
                    ix.push(i);
                    vals.push((super::super::rng::uniform(seed ^ 1, u64::from(i)) - 0.5) * 100.0);
                }
            }
            let mut formats: Vec<Option<IndexFormat>> = INDEX.iter().copied().map(Some).collect();
            formats.push(None);
            if ix.len() == n {
                formats.push(Some(IndexFormat::Dense));
            }
            for index in formats {
                for values in VALUES {
                    let e = enc(index, values, chunk);
                    let mut dec = Vec::new();
                    let p = encode(n, &ix, &vals, &e, Rounding::Nearest, Some(&mut dec)).unwrap();
                    let h = parse_header(&p).unwrap();
                    let chosen = index.unwrap_or(h.index);
                    prop_assert_eq!(h.index, chosen);
                    prop_assert_eq!(p.len(), formula(chosen, values, n, &ix, chunk as usize));
                    if index.is_none() {
                        for other in INDEX {
                            prop_assert!(p.len() <= formula(other, values, n, &ix, chunk as usize));
                        }
                    }
                    let d = decode(&p).unwrap();
                    let (got_ix, got_v) = d.to_sparse();
                    prop_assert_eq!(&got_ix, &ix);
                    prop_assert_eq!(&got_v, &dec);
                    for (c, (vs, ds)) in vals.chunks(chunk as usize).zip(got_v.chunks(chunk as usize)).enumerate() {
                        let m = vs.iter().fold(0f32, |a, v| a.max(v.abs()));
                        for (&v, &g) in vs.iter().zip(ds) {
                            prop_assert!((v - g).abs() <= tolerance(values, v, m), "chunk {} {} vs {}", c, v, g);
                        }
                    }
                    // dense writers agree with the sparse view
                    let mut out = vec![7f32; n];
                    decompress_into(&p, &mut out, Write::Overwrite).unwrap();
                    let mut want = vec![0f32; n];
                    for (&i, &v) in ix.iter().zip(&dec) {
                        want[i as usize] = v;
                    }
                    prop_assert_eq!(&out, &want);
                    decompress_into(&p, &mut out, Write::Add(-1.0)).unwrap();
                    prop_assert!(out.iter().all(|&x| x == 0.0));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn prop_fast_and_slow_varint_readers_agree(w in any::<[u8; 8]>()) {
            let fast = varint_fast(&w);
            let slow = varint_slow(&w);
            prop_assert_eq!(fast.is_ok(), slow.is_ok(), "{:?} {:?}", fast, slow);
            if let (Ok(f), Ok(s)) = (fast, slow) {
                prop_assert_eq!(f, s);
            }
        }
    }

    #[test]
    fn sum_of_payloads_is_the_sum_of_dense() {
        let n = 200_000; // several parallel tasks
        let mut want = vec![1f32; n];
        let mut payloads = Vec::new();
        for r in 0..5u64 {
            let ix: Vec<u32> = (0..n as u32)
                .filter(|i| (i * 7 + r as u32).is_multiple_of(13))
                .collect();
            let vals: Vec<f32> = ix.iter().map(|&i| i as f32 * 0.25 - r as f32).collect();
            for (&i, &v) in ix.iter().zip(&vals) {
                want[i as usize] += 0.5 * v;
            }
            let index =
                [IndexFormat::Varint, IndexFormat::Bitmap, IndexFormat::Raw][r as usize % 3];
            payloads.push(
                encode(
                    n,
                    &ix,
                    &vals,
                    &enc(Some(index), ValueFormat::F32, 0),
                    Rounding::Nearest,
                    None,
                )
                .unwrap(),
            );
        }
        let views: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let mut out = vec![1f32; n];
        decompress_sum(&views, &mut out, 0.5).unwrap();
        assert_eq!(out, want);
        // Overwriting ignores what was there (NaN here): the same sum without the 1s.
        let mut over = vec![f32::NAN; n];
        decompress_sum_overwrite(&views, &mut over, 0.5).unwrap();
        let want_over: Vec<f32> = want.iter().map(|w| w - 1.0).collect();
        for (i, (&o, &w)) in over.iter().zip(&want_over).enumerate() {
            assert!(
                (o - w).abs() <= 1e-3 * w.abs().max(1.0),
                "at {i}: {o} vs {w}"
            );
        }
    }

    #[test]
    fn sum_touches_nothing_when_one_payload_is_bad() {
        let good = encode(
            10,
            &[1, 2],
            &[1.0, 2.0],
            &enc(None, ValueFormat::F32, 0),
            Rounding::Nearest,
            None,
        )
        .unwrap();
        let mut bad = good.clone();
        bad[HEADER_LEN] ^= 1;
        let mut out = vec![0f32; 10];
        let err = decompress_sum(&[&good, &bad], &mut out, 1.0).unwrap_err();
        assert!(
            err.to_string().contains("payload 1: checksum mismatch"),
            "{err}"
        );
        assert!(out.iter().all(|&x| x == 0.0));
        let mut kept = vec![3f32; 10];
        let err = decompress_sum_overwrite(&[&good, &bad], &mut kept, 1.0).unwrap_err();
        assert!(err.to_string().contains("payload 1: checksum mismatch"));
        assert!(
            kept.iter().all(|&x| x == 3.0),
            "a refused overwrite must not write"
        );
        let other_n = encode(
            11,
            &[1],
            &[1.0],
            &enc(None, ValueFormat::F32, 0),
            Rounding::Nearest,
            None,
        )
        .unwrap();
        let err = decompress_sum(&[&good, &other_n], &mut out, 1.0).unwrap_err();
        assert!(
            err.to_string().contains("payload 1: payload is for n = 11"),
            "{err}"
        );
    }

    fn reseal(p: &mut [u8]) {
        let end = p.len() - 4;
        let crc = crc32c::crc32c(&p[..end]);
        p[end..].copy_from_slice(&crc.to_le_bytes());
    }

    fn message(p: &[u8]) -> String {
        match decode(p) {
            Err(CompressError::Corrupt(m)) => m,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn each_defect_is_named() {
        let e = enc(Some(IndexFormat::Varint), ValueFormat::Int8, 4);
        let p = encode(
            300,
            &[0, 5, 200],
            &[1.0, -2.0, 3.0],
            &e,
            Rounding::Nearest,
            None,
        )
        .unwrap();
        assert!(message(&p[..10]).contains("truncated"));
        assert!(message(&p[..p.len() - 1]).contains("truncated: header describes"));
        let mut longer = p.clone();
        longer.push(0);
        assert!(message(&longer).contains("oversized"));
        assert!(message(b"PK\x03\x04 a zip file, not ours").contains("not a moecore payload"));
        let mut q = p.clone();
        q[4] = 2;
        assert!(message(&q).contains("unsupported format version 2"));
        let mut q = p.clone();
        q[HEADER_LEN + 1] ^= 0x10;
        assert!(message(&q).contains("checksum mismatch"));
        // Defects behind a valid checksum are caught by the content checks.
        let mut q = p.clone();
        q[HEADER_LEN + 3] = 0x81; // the last varint runs past its section
        reseal(&mut q);
        assert!(message(&q).contains("varint"), "{}", message(&q));
        let mut q = p.clone();
        q[HEADER_LEN + 4 + 4 + 1] = 0x80; // code -128
        reseal(&mut q);
        assert!(message(&q).contains("-128"));
        let mut q = p.clone();
        q[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&(-1.0f32).to_le_bytes());
        reseal(&mut q);
        assert!(message(&q).contains("scale"));
        let mut q = p.clone();
        q[8..16].copy_from_slice(&100u64.to_le_bytes()); // n = 100 < index 200
        reseal(&mut q);
        assert!(message(&q).contains("out of range"));
        let mut q = p.clone();
        q[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        reseal(&mut q);
        assert!(message(&q).contains("larger than the format allows"));
    }

    #[test]
    fn lying_header_cannot_force_a_large_output() {
        // n = 2³² − 1 with nothing sent is a valid 44-byte payload; writing it needs an output
        // of that size, which the caller supplies (and here does not).
        let p = encode(
            MAX_N,
            &[],
            &[],
            &enc(Some(IndexFormat::Varint), ValueFormat::F32, 0),
            Rounding::Nearest,
            None,
        )
        .unwrap();
        assert_eq!(p.len(), 44);
        let mut out = vec![0f32; 8];
        let err = decompress_into(&p, &mut out, Write::Overwrite).unwrap_err();
        assert!(
            err.to_string().contains("payload is for n = 4294967295"),
            "{err}"
        );
    }
}
