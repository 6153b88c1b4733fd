//! The weight gradient at the kept blocks only (SDDMM): for each stored block `(i, j)`,
//! `dW_ij = dy[:, i-block]ᵀ · x[:, j-block]`, reduced over all `n` rows. Pruned blocks cost
//! nothing.
//!
//! Rows are taken in super-panels that fit the last-level cache, and each super-panel of `x`
//! and of `dy` is packed into one contiguous `[rows, B]` panel per block-column, starting on a
//! cache line, the next super-panel while the current one is reduced ([`pipeline`]). Within
//! one, one task per run of consecutive kept blocks (rayon splits the block list, so a task's
//! blocks mostly share their block-row and its `dy` panel stays in L1/L2), each block written
//! by exactly one task. Rows are reduced in chunks small enough that the `x` and `dy` rows of
//! a chunk stay in L1 while every tile of the block passes over them.
//!
//! Why `dy` is packed too: read in place, the rows of a block are `rows · 4` bytes apart
//! (16 KiB at 4096 rows), so all of a chunk's rows fall into one L1 set (and a few L2 sets)
//! and evict each other: every tile re-read `dy` from L3. On Zen 3 (AVX2, one thread, CPU
//! time) packing it took dW at B = 32, N = 512 from 21–24 to 39–49 GFLOP/s, with the
//! 6-row AVX2 tiles and the unrolled reduction (`kernels.rs`); packing is ~12 % of dW's
//! samples on one thread and overlaps the reduction on two.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::error::Result;
use super::kernels::{sddmm_kernel, Isa, SddmmArgs};
use super::linear::{check_blocks, check_len, superpanels, usable};
use super::pack::{pack_column_panels, pipeline, with_workspace, Stage};
use super::pattern::BsrPattern;
use crate::linalg::buffers::{as_uninit, filled, write_zeros};

/// Rows reduced per pass over the tiles of a block.
const ROW_CHUNK: usize = 64;

/// Bytes of `x` and `dy` rows one pass over all blocks reduces (the packed `x` rows and the
/// `dy` rows read in place). Larger than the forward's: every pass reads and rewrites all of
/// `dw` once.
const SUPERPANEL_BYTES: usize = 8 << 20;

/// `dw[b] = dy[:, i-block]ᵀ · x[:, j-block]` for every stored block `b = (i, j)` of `pattern`:
/// `dy` is `[n, rows]`, `x` is `[n, cols]`, `dw` is `[nnzb, B, B]`; every element of `dw` is
/// written (zeros when `n == 0`).
pub fn bsr_linear_dw(
    dy: &[f32],
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    dw: &mut [f32],
) -> Result<()> {
    bsr_linear_dw_with(Isa::detect(), dy, x, n, pattern, dw)
}

/// [`bsr_linear_dw`] with an explicit instruction set.
pub fn bsr_linear_dw_with(
    isa: Isa,
    dy: &[f32],
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    dw: &mut [f32],
) -> Result<()> {
    dw_in_superpanels(isa, dy, x, n, pattern, dw, SUPERPANEL_BYTES)
}

/// [`bsr_linear_dw`] into a new `[nnzb, B, B]` vector, never zeroed first.
pub fn bsr_linear_dw_vec(
    dy: &[f32],
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
) -> Result<Vec<f32>> {
    check_inputs(dy, x, n, pattern)?;
    let fill = |dw: &mut [MaybeUninit<f32>]| {
        weight_grad(Isa::detect(), dy, x, n, pattern, dw, SUPERPANEL_BYTES);
    };
    // SAFETY: the inputs are valid (checked above) and `weight_grad` writes every element.
    Ok(unsafe { filled("dw", pattern.data_len(), fill) }?)
}

/// [`bsr_linear_dw_with`] sweeping super-panels of about `superpanel_bytes` of `x` and `dy`
/// rows (a parameter so that tests can cross super-panel boundaries on small shapes).
pub(crate) fn dw_in_superpanels(
    isa: Isa,
    dy: &[f32],
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    dw: &mut [f32],
    superpanel_bytes: usize,
) -> Result<()> {
    check_inputs(dy, x, n, pattern)?;
    check_blocks("dw", dw, pattern)?;
    weight_grad(isa, dy, x, n, pattern, as_uninit(dw), superpanel_bytes);
    Ok(())
}

fn check_inputs(dy: &[f32], x: &[f32], n: usize, pattern: &BsrPattern) -> Result<()> {
    check_len("dy", dy.len(), n, pattern.rows(), "n × rows")?;
    check_len("x", x.len(), n, pattern.cols(), "n × cols")
}

/// dW on inputs [`check_inputs`] accepted, into `dw` of `nnzb · B²` elements, every one of
/// which it writes: zeros when `n == 0`, else each block's first row chunk overwrites every
/// tile of the block and later chunks add to it.
fn weight_grad(
    isa: Isa,
    dy: &[f32],
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    dw: &mut [MaybeUninit<f32>],
    superpanel_bytes: usize,
) {
    let (rows, cols, b) = (pattern.rows(), pattern.cols(), pattern.block());
    assert_eq!(dw.len(), pattern.data_len(), "dw: nnzb × B² elements");
    if pattern.nnzb() == 0 {
        return;
    }
    if n == 0 {
        write_zeros(dw);
        return;
    }
    let kernel = sddmm_kernel(usable(isa), b);
    let row_tiles = kernel.row_tiles(b);
    // Super-panels of rows keep the `x` and `dy` rows being reduced in the last-level cache
    // while every block passes over them; each block's accumulator is carried between
    // super-panels in `dw` itself (4 bytes per kept weight, far less than re-reading x and dy).
    // Each super-panel of `x` and `dy` is first packed into one contiguous `[h, B]` panel per
    // block-column, so the kernel walks consecutive addresses (in place, every row of a block
    // is on another page: one TLB miss per row, no hardware prefetch, and cache-set
    // conflicts; see the module doc).
    with_workspace(|ws| {
        let spans = superpanels(n, rows + cols, ROW_CHUNK, superpanel_bytes);
        let pack = |(s0, s1), stage: &mut Stage| {
            pack_column_panels(x, cols, s0, s1, b, &mut stage.x_panels);
            pack_column_panels(dy, rows, s0, s1, b, &mut stage.dy_panels);
        };
        pipeline(&spans, &mut ws.stages, pack, |(s0, s1), stage| {
            let h = s1 - s0;
            let xp = stage.x_panels.get(h * cols);
            let dyp = stage.dy_panels.get(h * rows);
            dw.par_chunks_mut(b * b).enumerate().for_each(|(blk, out)| {
                let i = pattern.block_row_of()[blk] as usize;
                let j = pattern.indices()[blk] as usize;
                for r0 in (0..h).step_by(ROW_CHUNK) {
                    let depth = ROW_CHUNK.min(h - r0);
                    for &(o0, run) in &row_tiles {
                        for c0 in (0..b).step_by(kernel.nr) {
                            let args = SddmmArgs {
                                // SAFETY (pointer arithmetic): panel i of dyp holds h·B floats
                                // and r0 < h, o0 < B.
                                dy: unsafe { dyp.as_ptr().add((i * h + r0) * b + o0) },
                                lddy: b,
                                // SAFETY (pointer arithmetic): panel j of xp holds h·B floats
                                // and r0 < h, c0 < B.
                                x: unsafe { xp.as_ptr().add((j * h + r0) * b + c0) },
                                ldx: b,
                                n: depth,
                                // SAFETY (pointer arithmetic): o0 < B and c0 < B inside this
                                // block.
                                out: unsafe { out.as_mut_ptr().add(o0 * b + c0).cast::<f32>() },
                                ldo: b,
                                accumulate: s0 + r0 > 0,
                            };
                            // SAFETY: the kernel matches a supported ISA. It reads rows
                            // r0..r0+depth ≤ h of panel i of dyp (i < rows/B; columns
                            // o0 .. o0 + tile rows ≤ B), rows r0..r0+depth ≤ h of panel j of xp
                            // (j < cols/B; columns c0..c0+nr ≤ B), and reads/writes tile rows
                            // ≤ B and columns c0..c0+nr ≤ B of `out`, this task's own block.
                            unsafe { run(&args) };
                        }
                    }
                }
            });
        });
    });
}
