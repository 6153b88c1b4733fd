//! The wire format's encoder: header, index section (varint / bitmap / raw / dense), value
//! section (f32 / f16 / bf16 / int8 with per-chunk scales) and the CRC32C trailer. The layout
//! and the size formula are in the docs of [`crate::compress`].

use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;

use super::rng::uniform;
use super::{CompressError, MAX_N};

pub const MAGIC: [u8; 4] = *b"MoEC";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 40;
pub const TRAILER_LEN: usize = 4;
/// Largest int8 chunk (values per scale).
pub const MAX_CHUNK: u32 = 1 << 24;
/// Largest magnitude f16 represents; larger values saturate to it.
pub const F16_MAX: f32 = 65504.0;

/// How the sent indices are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IndexFormat {
    /// Gaps minus one as minimal LEB128.
    Varint = 0,
    /// One bit per element of the dense gradient.
    Bitmap = 1,
    /// Little-endian u32 each.
    Raw = 2,
    /// No indices: every element is sent (k = n).
    Dense = 3,
}

/// How the sent values are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ValueFormat {
    F32 = 0,
    /// IEEE half precision, round to nearest even, saturating at ±65504.
    F16 = 1,
    /// bfloat16, round to nearest even, saturating at its largest finite value.
    Bf16 = 2,
    /// Signed 8-bit codes in [-127, 127] times one f32 scale per chunk of values.
    Int8 = 3,
}

impl IndexFormat {
    pub fn from_code(code: u8) -> Option<Self> {
        [Self::Varint, Self::Bitmap, Self::Raw, Self::Dense]
            .into_iter()
            .find(|f| *f as u8 == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Varint => "varint",
            Self::Bitmap => "bitmap",
            Self::Raw => "raw",
            Self::Dense => "dense",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Varint, Self::Bitmap, Self::Raw, Self::Dense]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

impl ValueFormat {
    pub fn from_code(code: u8) -> Option<Self> {
        [Self::F32, Self::F16, Self::Bf16, Self::Int8]
            .into_iter()
            .find(|f| *f as u8 == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::F32, Self::F16, Self::Bf16, Self::Int8]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// What the encoder writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoding {
    /// `None` picks the smallest (dense when every element is sent).
    pub index: Option<IndexFormat>,
    pub values: ValueFormat,
    /// Values per int8 scale (ignored by the other value formats).
    pub chunk: u32,
}

impl Encoding {
    /// Checks what can be checked before any data is seen.
    pub fn validate(&self) -> Result<(), CompressError> {
        if self.values == ValueFormat::Int8 && !(1..=MAX_CHUNK).contains(&self.chunk) {
            return Err(CompressError::InvalidArgument(format!(
                "chunk must be in 1..={MAX_CHUNK} for int8 values, got {}",
                self.chunk
            )));
        }
        Ok(())
    }

    /// Checks that this encoding can carry k of n elements.
    pub fn validate_for(&self, n: usize, k: usize) -> Result<(), CompressError> {
        self.validate()?;
        if k > n || n > MAX_N {
            return Err(CompressError::BadK { k, n });
        }
        if self.index == Some(IndexFormat::Dense) && k != n {
            return Err(CompressError::InvalidArgument(format!(
                "index encoding 'dense' sends every element, but k = {k} < n = {n}"
            )));
        }
        Ok(())
    }
}

/// How int8 codes are rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// To nearest, ties to even.
    Nearest,
    /// Down or up with probability given by the fraction (unbiased), drawn from `seed` and
    /// the element's position, so it is reproducible and independent of threads.
    Stochastic { seed: u64 },
}

/// The fixed-size header of a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub index: IndexFormat,
    pub values: ValueFormat,
    pub n: u64,
    pub k: u64,
    pub index_bytes: u64,
    /// Values per int8 scale; 0 for the other value formats.
    pub chunk: u32,
}

impl Header {
    /// Bytes of the value section (scales included), `None` on overflow.
    pub fn value_bytes(&self) -> Option<u64> {
        value_bytes(self.values, self.k, self.chunk)
    }

    /// Bytes of the whole payload this header describes, `None` on overflow.
    pub fn total_len(&self) -> Option<u64> {
        (HEADER_LEN as u64 + TRAILER_LEN as u64)
            .checked_add(self.index_bytes)?
            .checked_add(self.value_bytes()?)
    }

    pub(crate) fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.index as u8;
        out[6] = self.values as u8;
        out[7] = 0;
        out[8..16].copy_from_slice(&self.n.to_le_bytes());
        out[16..24].copy_from_slice(&self.k.to_le_bytes());
        out[24..32].copy_from_slice(&self.index_bytes.to_le_bytes());
        out[32..36].copy_from_slice(&self.chunk.to_le_bytes());
        out[36..40].fill(0);
    }
}

/// Bytes of a value section holding k values (`None` on overflow or a zero int8 chunk).
pub fn value_bytes(format: ValueFormat, k: u64, chunk: u32) -> Option<u64> {
    match format {
        ValueFormat::F32 => k.checked_mul(4),
        ValueFormat::F16 | ValueFormat::Bf16 => k.checked_mul(2),
        ValueFormat::Int8 => {
            let scales = k.checked_add(u64::from(chunk).checked_sub(1)?)? / u64::from(chunk);
            k.checked_add(scales.checked_mul(4)?)
        }
    }
}

/// LEB128 length of `v`, as comparisons that vectorise (no branch, no bit scan).
#[inline]
pub fn varint_len(v: u32) -> usize {
    1 + usize::from(v >= 1 << 7)
        + usize::from(v >= 1 << 14)
        + usize::from(v >= 1 << 21)
        + usize::from(v >= 1 << 28)
}

/// The LEB128 bytes of `v` in the low `varint_len(v)` bytes of a little-endian word.
#[inline]
fn varint_word(v: u32, len: usize) -> u64 {
    let d = u64::from(v);
    let spread = (d & 0x7f)
        | ((d >> 7) & 0x7f) << 8
        | ((d >> 14) & 0x7f) << 16
        | ((d >> 21) & 0x7f) << 24
        | (d >> 28) << 32;
    spread | (0x80_8080_8080u64 & ((1u64 << (8 * (len - 1))) - 1))
}

/// The gaps the varint encoding stores: the first index, then each gap minus one. Starting
/// from "previous = −1" (u32::MAX, wrapping) makes the first gap the first index, with no
/// special case.
fn gaps(indices: &[u32]) -> impl Iterator<Item = u32> + '_ {
    gaps_after(u32::MAX, indices)
}

/// The gaps of `indices` when the index before them was `before`.
fn gaps_after(before: u32, indices: &[u32]) -> impl Iterator<Item = u32> + '_ {
    indices.iter().scan(before, |previous, &i| {
        let gap = i.wrapping_sub(*previous).wrapping_sub(1);
        *previous = i;
        Some(gap)
    })
}

/// Bytes of the index section for `indices` (increasing, < n) in `format`.
pub fn index_bytes(format: IndexFormat, n: usize, indices: &[u32]) -> usize {
    match format {
        IndexFormat::Varint => gaps(indices).map(varint_len).sum(),
        IndexFormat::Bitmap => n.div_ceil(8),
        IndexFormat::Raw => 4 * indices.len(),
        IndexFormat::Dense => 0,
    }
}

/// The index format `auto` picks and its section size: dense when k = n, else the smallest
/// of varint, bitmap, raw (in that order on ties).
pub fn choose_index(n: usize, indices: &[u32]) -> (IndexFormat, usize) {
    choose_with(n, indices.len(), || {
        index_bytes(IndexFormat::Varint, n, indices)
    })
}

/// [`choose_index`] for k indices, `varint` giving the varint section's size (called only
/// when varint could win).
fn choose_with(n: usize, k: usize, varint: impl FnOnce() -> usize) -> (IndexFormat, usize) {
    if k == n {
        return (IndexFormat::Dense, 0);
    }
    let raw = 4 * k;
    let bitmap = n.div_ceil(8);
    // Varint costs at least one byte per index: skip counting when that already loses.
    if k <= raw.min(bitmap) {
        let varint = varint();
        if varint <= raw.min(bitmap) {
            return (IndexFormat::Varint, varint);
        }
    }
    if bitmap <= raw {
        (IndexFormat::Bitmap, bitmap)
    } else {
        (IndexFormat::Raw, raw)
    }
}

/// Encodes `values` at `indices` (strictly increasing, < n) of a dense gradient of length n.
/// When `decoded` is given it receives what the decoder will reproduce for each value (for
/// error feedback). Checks its inputs: lengths, order, range, finiteness.
pub fn encode(
    n: usize,
    indices: &[u32],
    values: &[f32],
    encoding: &Encoding,
    rounding: Rounding,
    decoded: Option<&mut Vec<f32>>,
) -> Result<Vec<u8>, CompressError> {
    let k = indices.len();
    if values.len() != k {
        return Err(CompressError::LengthMismatch {
            what: "values",
            got: values.len(),
            expected: k,
        });
    }
    encoding.validate_for(n, k)?;
    if let Some(w) = indices.windows(2).position(|w| w[0] >= w[1]) {
        return Err(CompressError::InvalidArgument(format!(
            "indices must be strictly increasing: indices[{w}] = {} then {}",
            indices[w],
            indices[w + 1]
        )));
    }
    if let Some(&last) = indices.last() {
        if last as usize >= n {
            return Err(CompressError::InvalidArgument(format!(
                "index {last} is out of range for n = {n}"
            )));
        }
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(CompressError::NonFinite {
            what: "values",
            index: i,
            value: values[i],
        });
    }
    encode_checked(n, indices, values, encoding, rounding, decoded)
}

/// [`encode`] without the input checks (the caller guarantees them).
pub(crate) fn encode_checked(
    n: usize,
    indices: &[u32],
    values: &[f32],
    encoding: &Encoding,
    rounding: Rounding,
    decoded: Option<&mut Vec<f32>>,
) -> Result<Vec<u8>, CompressError> {
    with_scratch(|varints| {
        let k = indices.len();
        // Whenever the varint section gets sized, it is written too (into `varints`).
        let mut written = None;
        let mut write_varints = || *written.insert(varint_section(indices, varints));
        let (index, section) = match encoding.index {
            Some(IndexFormat::Varint) => (IndexFormat::Varint, write_varints()),
            Some(f) => (f, index_bytes(f, n, indices)),
            None => choose_with(n, k, write_varints),
        };
        let chunk = if encoding.values == ValueFormat::Int8 {
            encoding.chunk
        } else {
            0
        };
        let header = Header {
            index,
            values: encoding.values,
            n: n as u64,
            k: k as u64,
            index_bytes: section as u64,
            chunk,
        };
        let total = header
            .total_len()
            .and_then(|t| usize::try_from(t).ok())
            .ok_or(CompressError::BadK { k, n })?;
        let mut out = vec![0u8; total];
        header.write(&mut out[..HEADER_LEN]);
        let body_end = total - TRAILER_LEN;
        let index_section = &mut out[HEADER_LEN..HEADER_LEN + section];
        match (index, written) {
            (IndexFormat::Varint, Some(len)) => index_section.copy_from_slice(&varints[..len]),
            _ => write_indices(index, indices, index_section),
        }
        let value_section = &mut out[HEADER_LEN + header.index_bytes as usize..body_end];
        write_values(
            encoding.values,
            chunk,
            values,
            value_section,
            rounding,
            decoded,
        );
        let crc = crc32c::crc32c(&out[..body_end]);
        out[body_end..].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    })
}

thread_local! {
    /// The varint section is written here in the pass that sizes it, then copied into the
    /// payload (whose size depends on it); reused so that large sections do not page-fault
    /// on every call.
    static VARINTS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Largest varint scratch (bytes) kept for the next call.
const KEEP_VARINTS: usize = 1 << 23;

/// Runs `f` with this thread's varint scratch, or a fresh one in a nested call (a pool thread
/// waiting inside one encoding may pick up another's job).
fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    VARINTS.with(|kept| match kept.try_borrow_mut() {
        Ok(mut varints) => {
            let done = f(&mut varints);
            if varints.capacity() > KEEP_VARINTS {
                *varints = Vec::new();
            }
            done
        }
        Err(_) => f(&mut Vec::new()),
    })
}

/// Writes the bitmap or raw index section into `out` (exactly the section; the varint
/// section is written by [`varint_section`]).
fn write_indices(format: IndexFormat, indices: &[u32], out: &mut [u8]) {
    match format {
        IndexFormat::Bitmap => {
            for &i in indices {
                out[i as usize / 8] |= 1 << (i % 8);
            }
        }
        IndexFormat::Raw => {
            for (dst, &i) in out.chunks_exact_mut(4).zip(indices) {
                dst.copy_from_slice(&i.to_le_bytes());
            }
        }
        IndexFormat::Varint | IndexFormat::Dense => {}
    }
}

/// Indices per piece of a varint section written in parallel.
const VARINT_PIECE: usize = 1 << 14;

/// Writes the varint section of `indices` at the start of `out` (grown as needed; bytes past
/// the section are scratch) and returns its length. One pass both sizes and writes it: each
/// piece of [`VARINT_PIECE`] indices is written (in parallel) into a region with room for
/// its longest encoding, then the pieces are moved together.
fn varint_section(indices: &[u32], out: &mut Vec<u8>) -> usize {
    let region = 5 * VARINT_PIECE + 8;
    let pieces = indices.len().div_ceil(VARINT_PIECE).max(1);
    let room = 5 * indices.len() + 8 * pieces;
    if out.len() < room {
        out.resize(room, 0);
    }
    if indices.len() <= 2 * VARINT_PIECE {
        return varint_piece(u32::MAX, indices, out);
    }
    let lens: Vec<usize> = out[..room]
        .par_chunks_mut(region)
        .zip(indices.par_chunks(VARINT_PIECE))
        .enumerate()
        .map(|(p, (dst, piece))| {
            let before = p
                .checked_sub(1)
                .map_or(u32::MAX, |q| indices[(q + 1) * VARINT_PIECE - 1]);
            varint_piece(before, piece, dst)
        })
        .collect();
    let mut at = 0;
    for (p, &len) in lens.iter().enumerate() {
        out.copy_within(p * region..p * region + len, at);
        at += len;
    }
    at
}

/// Writes the varints of `indices` (after index `before`) at the start of `out`, which has
/// room for 5 bytes per index plus 8: each varint is stored as a whole 8-byte word that the
/// next one partly overwrites. Returns the bytes written.
fn varint_piece(before: u32, indices: &[u32], out: &mut [u8]) -> usize {
    let mut at = 0;
    for d in gaps_after(before, indices) {
        let len = varint_len(d);
        out[at..at + 8].copy_from_slice(&varint_word(d, len).to_le_bytes());
        at += len;
    }
    at
}

fn write_values(
    format: ValueFormat,
    chunk: u32,
    values: &[f32],
    out: &mut [u8],
    rounding: Rounding,
    decoded: Option<&mut Vec<f32>>,
) {
    let mut sink = decoded;
    if let Some(d) = sink.as_mut() {
        d.clear();
        d.reserve(values.len());
    }
    match format {
        ValueFormat::F32 => {
            for (dst, &v) in out.chunks_exact_mut(4).zip(values) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            if let Some(d) = sink.as_mut() {
                d.extend_from_slice(values);
            }
        }
        ValueFormat::F16 => {
            for (dst, &v) in out.chunks_exact_mut(2).zip(values) {
                let h = to_f16(v);
                dst.copy_from_slice(&h.to_bits().to_le_bytes());
                if let Some(d) = sink.as_mut() {
                    d.push(h.to_f32());
                }
            }
        }
        ValueFormat::Bf16 => {
            for (dst, &v) in out.chunks_exact_mut(2).zip(values) {
                let b = to_bf16(v);
                dst.copy_from_slice(&b.to_bits().to_le_bytes());
                if let Some(d) = sink.as_mut() {
                    d.push(b.to_f32());
                }
            }
        }
        ValueFormat::Int8 => {
            let chunk = chunk as usize;
            let (scales, codes) = out.split_at_mut(4 * values.len().div_ceil(chunk));
            for (c, ((vals, codes), scale_out)) in values
                .chunks(chunk)
                .zip(codes.chunks_mut(chunk))
                .zip(scales.chunks_exact_mut(4))
                .enumerate()
            {
                // Values were checked finite by the caller.
                let scale =
                    quantize_chunk(vals, codes, rounding, (c * chunk) as u64).unwrap_or(0.0);
                scale_out.copy_from_slice(&scale.to_le_bytes());
                if let Some(d) = sink.as_mut() {
                    d.extend(codes.iter().map(|&q| f32::from(q as i8) * scale));
                }
            }
        }
    }
}

/// f16 of `v`, saturating at ±65504 instead of overflowing to infinity.
pub(crate) fn to_f16(v: f32) -> f16 {
    f16::from_f32(v.clamp(-F16_MAX, F16_MAX))
}

/// bf16 of `v`, saturating at its largest finite value instead of rounding up to infinity.
pub(crate) fn to_bf16(v: f32) -> bf16 {
    let b = bf16::from_f32(v);
    if b.is_infinite() {
        if v > 0.0 {
            bf16::MAX
        } else {
            bf16::MIN
        }
    } else {
        b
    }
}

/// Quantizes one chunk of values to int8 codes (written to `codes`) and returns its scale
/// `max|v| / 127`, or `None` if the chunk holds NaN or ±inf; the decoder reproduces
/// `code · scale`. `first` is the position of
/// `vals[0]` in the stream, for reproducible stochastic rounding.
pub(crate) fn quantize_chunk(
    vals: &[f32],
    codes: &mut [u8],
    rounding: Rounding,
    first: u64,
) -> Option<f32> {
    // The largest |v| as the largest magnitude key: an integer max, which vectorises (and
    // exceeds every finite key when a NaN or ±inf is present).
    let top = vals
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    if top >= 0x7f80_0000 {
        return None;
    }
    let max_abs = f32::from_bits(top);
    let scale = max_abs / 127.0;
    if scale == 0.0 {
        // Includes max|v| so small that the scale underflows: send zeros.
        codes.fill(0);
        return Some(0.0);
    }
    // 127/max|v| overflows for tiny max|v|; f64 covers every finite f32 there.
    if max_abs >= 1e-30 {
        let inv = 127.0 / max_abs;
        quantize_scaled(vals, codes, rounding, first, |v| v * inv);
    } else {
        let inv = 127.0 / f64::from(max_abs);
        quantize_scaled(vals, codes, rounding, first, |v| {
            (f64::from(v) * inv) as f32
        });
    }
    Some(scale)
}

#[inline(always)]
fn quantize_scaled(
    vals: &[f32],
    codes: &mut [u8],
    rounding: Rounding,
    first: u64,
    scaled: impl Fn(f32) -> f32,
) {
    // 1.5·2²³: adding it rounds |r| < 2²² to the nearest integer (ties to even) and leaves
    // that integer, two's complement, in the low mantissa bits — so the code is the low byte
    // of the sum's bits. No libm call and no saturating float-to-int cast: the loops vectorise.
    const ROUND: f32 = 12_582_912.0;
    match rounding {
        Rounding::Nearest => {
            for (q, &v) in codes.iter_mut().zip(vals) {
                *q = (scaled(v).clamp(-127.0, 127.0) + ROUND).to_bits() as u8;
            }
        }
        Rounding::Stochastic { seed } => {
            for (j, (q, &v)) in codes.iter_mut().zip(vals).enumerate() {
                let t = scaled(v) + uniform(seed, first + j as u64);
                let nearest = (t + ROUND) - ROUND;
                let floor = nearest - if nearest > t { 1.0 } else { 0.0 };
                *q = (floor.clamp(-127.0, 127.0) + ROUND).to_bits() as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_len_matches_leb128() {
        for (v, len) in [
            (0u32, 1usize),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (268_435_455, 4),
            (268_435_456, 5),
            (u32::MAX, 5),
        ] {
            assert_eq!(varint_len(v), len, "{v}");
            let mut out = Vec::new();
            // The single index v is stored as the gap v.
            assert_eq!(varint_section(&[v], &mut out), len);
            assert_eq!(out[len - 1] & 0x80, 0);
            assert!(out[..len - 1].iter().all(|b| b & 0x80 != 0));
        }
    }

    /// Plain LEB128 of the gaps, one byte at a time: the reference for the word writer.
    fn leb128_reference(indices: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for mut d in gaps(indices) {
            while d >= 0x80 {
                out.push((d as u8 & 0x7f) | 0x80);
                d >>= 7;
            }
            out.push(d as u8);
        }
        out
    }

    #[test]
    fn varint_section_is_sized_and_written_in_one_pass_as_leb128() {
        // Gaps of every LEB128 length; a reused scratch longer than the section is fine.
        let mut scratch = vec![0xAAu8; 3];
        for k in [
            1usize,
            100,
            2 * VARINT_PIECE,
            2 * VARINT_PIECE + 1,
            5 * VARINT_PIECE + 7,
            20,
        ] {
            // The first index needs 5 bytes; every 64th gap up to 4, the others up to 2.
            let mut at = 300_000_000u32;
            let indices: Vec<u32> = (0..k as u64)
                .map(|i| {
                    let most = if i % 64 == 0 { 24.0 } else { 12.0 };
                    let bits = 1 + (uniform(k as u64, i) * most) as u32;
                    at += 1 + ((uniform(1, i) * (1u32 << bits) as f32) as u32 & ((1 << bits) - 1));
                    at
                })
                .collect();
            let want = leb128_reference(&indices);
            assert_eq!(
                index_bytes(IndexFormat::Varint, usize::MAX, &indices),
                want.len()
            );
            let len = varint_section(&indices, &mut scratch);
            assert_eq!(len, want.len(), "k = {k}");
            assert_eq!(scratch[..len], want[..], "k = {k}");
            // The payload carries exactly that section, whether varint was asked for or
            // chosen by `auto` (here whenever it beats raw).
            let auto = (choose_index(u32::MAX as usize, &indices).0 == IndexFormat::Varint)
                .then_some(None);
            for index in [Some(Some(IndexFormat::Varint)), auto]
                .into_iter()
                .flatten()
            {
                let enc = Encoding {
                    index,
                    values: ValueFormat::F32,
                    chunk: 0,
                };
                let values = vec![1.0f32; k];
                let p = encode(
                    u32::MAX as usize,
                    &indices,
                    &values,
                    &enc,
                    Rounding::Nearest,
                    None,
                )
                .unwrap();
                assert_eq!(p[5], 0, "varint index encoding");
                assert_eq!(p[HEADER_LEN..HEADER_LEN + len], want[..], "k = {k}");
            }
        }
    }

    #[test]
    fn header_layout_is_as_documented() {
        let p = encode(
            10,
            &[1, 4],
            &[1.5, -2.0],
            &Encoding {
                index: Some(IndexFormat::Raw),
                values: ValueFormat::F32,
                chunk: 0,
            },
            Rounding::Nearest,
            None,
        )
        .unwrap();
        assert_eq!(p.len(), 44 + 8 + 8);
        assert_eq!(&p[0..4], b"MoEC");
        assert_eq!(p[4..8], [1, 2, 0, 0]);
        assert_eq!(u64::from_le_bytes(p[8..16].try_into().unwrap()), 10);
        assert_eq!(u64::from_le_bytes(p[16..24].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(p[24..32].try_into().unwrap()), 8);
        assert_eq!(&p[40..48], &[1, 0, 0, 0, 4, 0, 0, 0]);
        assert_eq!(&p[48..52], &1.5f32.to_le_bytes());
        let crc = crc32c::crc32c(&p[..p.len() - 4]);
        assert_eq!(&p[p.len() - 4..], &crc.to_le_bytes());
    }

    #[test]
    fn crc32c_known_answer() {
        // The CRC-32C check value (RFC 3720 / iSCSI).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn auto_picks_the_smallest() {
        let n = 1000;
        let sparse: Vec<u32> = (0..10).map(|i| i * 97).collect();
        assert_eq!(choose_index(n, &sparse).0, IndexFormat::Varint);
        let dense: Vec<u32> = (0..600).collect();
        assert_eq!(choose_index(n, &dense).0, IndexFormat::Bitmap); // 125 bytes < 600 varint
        let all: Vec<u32> = (0..1000).collect();
        assert_eq!(choose_index(n, &all).0, IndexFormat::Dense);
        let spread = [1_000_000u32, 2_000_000];
        assert_eq!(choose_index(4_000_000, &spread).0, IndexFormat::Varint); // 3 + 3 < 8
        let far = [300_000_000u32, 600_000_000, 900_000_000];
        assert_eq!(choose_index(1_000_000_000, &far).0, IndexFormat::Raw); // 5-byte gaps: 15 > 12
    }

    #[test]
    fn int8_rounds_to_nearest_even_and_saturates_nothing() {
        let vals = [127.0f32, 0.5, 1.5, -2.5, -127.0, 63.5];
        let mut codes = [0u8; 6];
        let scale = quantize_chunk(&vals, &mut codes, Rounding::Nearest, 0);
        assert_eq!(scale, Some(1.0));
        let q: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
        assert_eq!(q, vec![127, 0, 2, -2, -127, 64]);
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let mut vals = vec![0.3f32; 100_001];
        vals[0] = 127.0;
        let mut codes = vec![0u8; vals.len()];
        let scale = quantize_chunk(&vals, &mut codes, Rounding::Stochastic { seed: 5 }, 0);
        assert_eq!(scale, Some(1.0));
        let ups = codes[1..].iter().filter(|&&c| c == 1).count();
        assert!(codes[1..].iter().all(|&c| c <= 1));
        assert!((29_000..31_000).contains(&ups), "{ups}");
    }

    #[test]
    fn saturation() {
        assert_eq!(to_f16(1e6).to_f32(), 65504.0);
        assert_eq!(to_f16(-1e6).to_f32(), -65504.0);
        assert!(to_bf16(f32::MAX).is_finite());
        assert!(to_bf16(-f32::MAX).to_f32() < 0.0);
    }
}
