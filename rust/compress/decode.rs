//! The validating decoder and the dense writers: decompress (overwrite or add) and the
//! parallel sum of many payloads. Nothing is written to the output until every payload
//! involved has been fully validated.

use half::{bf16, f16};
use rayon::prelude::*;

use super::codec::{
    Header, IndexFormat, ValueFormat, HEADER_LEN, MAGIC, MAX_CHUNK, TRAILER_LEN, VERSION,
};
use super::{corrupt, CompressError, MAX_N};

/// Output elements per parallel task: 64 KiB of f32, so a task's slice of the output stays in
/// cache while every payload adds into it.
const OUT_TASK: usize = 1 << 14;

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

/// How [`decompress_into`] writes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Write {
    /// `out = dense(payload)` (zeros where nothing was sent).
    Overwrite,
    /// `out += scale · dense(payload)`.
    Add(f32),
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
        let start = at;
        let mut gap = 0u64;
        let mut shift = 0u32;
        loop {
            let Some(&b) = sec.get(at) else {
                return Err(corrupt(format!(
                    "varint index section ends inside entry {j} of {k}"
                )));
            };
            at += 1;
            if shift == 28 && b > 0x0f {
                return Err(corrupt(format!("varint entry {j} does not fit in 32 bits")));
            }
            gap |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if b == 0 && at - start > 1 {
                    return Err(corrupt(format!("varint entry {j} is not minimally encoded")));
                }
                break;
            }
            shift += 7;
        }
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

fn read_bitmap(sec: &[u8], k: usize, n: usize) -> Result<Vec<u32>, CompressError> {
    if n % 8 != 0 {
        if let Some(&last) = sec.last() {
            if last >> (n % 8) != 0 {
                return Err(corrupt("bitmap has bits set beyond n"));
            }
        }
    }
    let set: u64 = sec.iter().map(|b| u64::from(b.count_ones())).sum();
    if set != k as u64 {
        return Err(corrupt(format!("bitmap has {set} bits set, header says k = {k}")));
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
        ValueFormat::F32 => sec.chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect(),
        ValueFormat::F16 => sec
            .chunks_exact(2)
            .map(|w| f16::from_bits(u16::from_le_bytes([w[0], w[1]])).to_f32())
            .collect(),
        ValueFormat::Bf16 => sec
            .chunks_exact(2)
            .map(|w| bf16::from_bits(u16::from_le_bytes([w[0], w[1]])).to_f32())
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
            return Some(format!("int8 chunk {c} has a zero scale but non-zero codes"));
        }
        None
    };
    let found = if codes.len() > OUT_TASK * 8 {
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
    fn add_range(&self, lo: usize, dst: &mut [f32], scale: f32) {
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
