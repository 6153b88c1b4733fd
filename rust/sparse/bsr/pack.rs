//! Packing of operands into the layouts the micro-kernels stream through, and the per-thread
//! workspace that keeps those buffers between calls (large fresh allocations cost a page fault
//! per 4 KiB on first touch, which is a visible share of a matmul of this size).

use std::cell::RefCell;

use rayon::prelude::*;

use super::kernels::transpose_block;
use crate::linalg::simd::vectorized;

/// Buffers reused by the calls made from one thread.
#[derive(Default)]
pub(crate) struct Workspace {
    /// The packed operands of two super-panels: the one being computed and the next one,
    /// packed meanwhile (see [`pipeline`]).
    pub stages: [Stage; 2],
    /// Transposed (forward) or gathered (dX) weight blocks.
    pub wt: Vec<f32>,
}

/// The packed operand of one super-panel.
#[derive(Default)]
pub(crate) struct Stage {
    /// Row groups of the row-major operand (forward, dX).
    pub packed: Vec<f32>,
    /// The column panels of `x` and of `dy` (dW).
    pub x_panels: LineAligned,
    pub dy_panels: LineAligned,
}

/// A reusable buffer whose contents start on a 64-byte cache line. A large `Vec<f32>` starts
/// 16 bytes past a page boundary (the allocator's header), so every other 32-byte row load of
/// a panel would straddle two cache lines and cost two loads.
#[derive(Default)]
pub(crate) struct LineAligned {
    buf: Vec<f32>,
}

impl LineAligned {
    /// Floats of slack kept so that the contents can start on a cache line.
    const SLACK: usize = 16;

    fn offset(&self) -> usize {
        // An f32 pointer is 4-byte aligned, so at most 15 floats separate it from a line.
        self.buf.as_ptr().align_offset(64).min(Self::SLACK - 1)
    }

    /// The first `len` floats, after growing the buffer to hold them (contents unspecified).
    pub fn resized(&mut self, len: usize) -> &mut [f32] {
        self.buf.resize(len + Self::SLACK, 0.0);
        let at = self.offset();
        &mut self.buf[at..at + len]
    }

    /// The first `len` floats, as [`LineAligned::resized`] last gave them.
    pub fn get(&self, len: usize) -> &[f32] {
        let at = self.offset();
        &self.buf[at..at + len]
    }
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Runs `work` with this thread's workspace (a fresh one if it is already in use, which only a
/// re-entrant call could cause).
pub(crate) fn with_workspace<T>(work: impl FnOnce(&mut Workspace) -> T) -> T {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => work(&mut ws),
        Err(_) => work(&mut Workspace::default()),
    })
}

/// Runs `compute` on each super-panel (row range) of `spans` in order, each after `pack` has
/// filled a stage with its operands; the next super-panel is packed while the current one is
/// computed. Packing is bound by memory and computing by arithmetic, so on a machine with
/// few cores the two overlap instead of one leaving the other's resource idle, and no core
/// waits at a barrier between the two phases: the core that finishes packing joins the
/// computation (rayon's `join` lets it steal the remaining work).
pub(crate) fn pipeline(
    spans: &[(usize, usize)],
    stages: &mut [Stage; 2],
    pack: impl Fn((usize, usize), &mut Stage) + Sync,
    mut compute: impl FnMut((usize, usize), &Stage) + Send,
) {
    let Some(&first) = spans.first() else {
        return;
    };
    let [one, two] = stages;
    let (mut current, mut next) = (one, two);
    pack(first, current);
    for (s, &span) in spans.iter().enumerate() {
        match spans.get(s + 1) {
            Some(&following) => {
                rayon::join(|| pack(following, next), || compute(span, current));
            }
            None => compute(span, current),
        }
        std::mem::swap(&mut current, &mut next);
    }
}

/// Packs rows `n0..n1` of the row-major `[_, width]` matrix `src` into groups of `mr` rows,
/// and within a group into `mr × b` sub-blocks per block-column `j`:
/// `dst[g·width·mr + (j·mr + r)·b + k] = src[n0 + g·mr + r, j·b + k]`, rows past `n1` zero.
/// Every run copied is `b` contiguous floats, so this goes at close to memory speed.
/// `dst` is resized to fit; groups are packed in parallel.
pub(crate) fn pack_row_groups(
    src: &[f32],
    width: usize,
    n0: usize,
    n1: usize,
    mr: usize,
    b: usize,
    dst: &mut Vec<f32>,
) {
    let groups = (n1 - n0).div_ceil(mr);
    let group_len = width * mr;
    dst.resize(groups * group_len, 0.0);
    if group_len == 0 {
        return;
    }
    dst[..groups * group_len]
        .par_chunks_mut(group_len)
        .enumerate()
        .for_each(|(g, out)| {
            let first = n0 + g * mr;
            let rows = mr.min(n1 - first);
            vectorized(
                #[inline(always)]
                || {
                    for (j, sub) in out.chunks_exact_mut(mr * b).enumerate() {
                        for (r, run) in sub.chunks_exact_mut(b).enumerate() {
                            if r < rows {
                                let at = (first + r) * width + j * b;
                                copy_run(run, &src[at..at + b]);
                            } else {
                                run.fill(0.0);
                            }
                        }
                    }
                },
            )
        });
}

/// Packs rows `n0..n1` of the row-major `[_, width]` matrix `src` into one contiguous
/// `[n1 - n0, b]` panel per block-column `j`: `dst[(j·h + r)·b + k] = src[n0 + r, j·b + k]` with
/// `h = n1 - n0`. A kernel that walks the rows of one block-column then reads consecutive
/// addresses instead of one row per page (TLB misses, no hardware prefetch across pages, and
/// rows a multiple of 4 KiB apart all falling into one cache set). `dst` is resized to fit;
/// `dst.get(h · width)` reads the panels back.
///
/// Each parallel task fills a few neighbouring panels row by row, so it reads `src` in
/// contiguous runs of [`PANEL_GROUP_BYTES`]. Filling one panel at a time would read it a
/// `b`-float run per row, each on another page: a third of memory speed, measured.
pub(crate) fn pack_column_panels(
    src: &[f32],
    width: usize,
    n0: usize,
    n1: usize,
    b: usize,
    dst: &mut LineAligned,
) {
    let h = n1 - n0;
    let dst = dst.resized(h * width);
    if h == 0 || width == 0 {
        return;
    }
    let panel = h * b;
    let group = (PANEL_GROUP_BYTES / (4 * b)).max(1);
    dst.par_chunks_mut(group * panel)
        .enumerate()
        .for_each(|(g, panels)| {
            let j0 = g * group;
            let count = panels.len() / panel;
            vectorized(
                #[inline(always)]
                || {
                    for r in 0..h {
                        let at = (n0 + r) * width + j0 * b;
                        let runs = src[at..at + count * b].chunks_exact(b);
                        for (jj, run) in runs.enumerate() {
                            let to = jj * panel + r * b;
                            copy_run(&mut panels[to..to + b], run);
                        }
                    }
                },
            )
        });
}

/// `dst.copy_from_slice(src)` for the runs of one block row (`b` floats) that packing copies,
/// as a few inlined vector moves when `b` is a block size: with `b` known only at run time the
/// copy is a `memmove` call per run, whose overhead made packing 13 % of the forward's samples
/// at N = 512, B = 32 (`perf`, one 128-byte call per run); inlined, 7 %. That is CPU time the
/// other thread or process gets back: the products' wall time did not measurably change, as
/// packing overlaps the computation ([`pipeline`]). Callers run it under [`vectorized`], so
/// the moves are as wide as the CPU allows.
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    match src.len() {
        8 => copy_fixed::<8>(dst, src),
        16 => copy_fixed::<16>(dst, src),
        32 => copy_fixed::<32>(dst, src),
        64 => copy_fixed::<64>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

#[inline(always)]
fn copy_fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
    let dst: &mut [f32; N] = dst.try_into().expect("runs of equal length");
    let src: &[f32; N] = src.try_into().expect("runs of equal length");
    *dst = *src;
}

/// Bytes of each `src` row one task of [`pack_column_panels`] copies at a time.
const PANEL_GROUP_BYTES: usize = 2048;

/// Copies the `b × b` blocks of `src` named by `order` into `dst` (resized to fit), in that
/// order: `dst` block `t` is `src` block `order[t]`. The dX kernel then reads each column's
/// blocks as one contiguous run instead of one page per block. In parallel.
pub(crate) fn gather_blocks(src: &[f32], order: &[u32], b: usize, dst: &mut Vec<f32>) {
    let len = order.len() * b * b;
    dst.resize(len, 0.0);
    if len == 0 {
        return;
    }
    dst[..len]
        .par_chunks_mut(b * b)
        .zip(order.par_iter())
        .with_min_len(16)
        .for_each(|(d, &blk)| {
            let at = blk as usize * b * b;
            d.copy_from_slice(&src[at..at + b * b]);
        });
}

/// Writes the transpose of each `b × b` block of `src` into `dst` (resized to fit), in parallel.
pub(crate) fn transpose_blocks(src: &[f32], b: usize, dst: &mut Vec<f32>) {
    dst.resize(src.len(), 0.0);
    if src.is_empty() {
        return;
    }
    src.par_chunks(b * b)
        .zip(dst[..src.len()].par_chunks_mut(b * b))
        .with_min_len(16)
        .for_each(|(s, d)| transpose_block(s, d, b));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_groups_with_zero_padding() {
        // 3 rows × 4 columns in blocks of 2, groups of 2 rows: group 0 = rows 0, 1;
        // group 1 = row 2 + a zero row. Within a group: block-column 0, then 1.
        let src: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        let mut dst = vec![f32::NAN; 1];
        pack_row_groups(&src, 4, 0, 3, 2, 2, &mut dst);
        #[rustfmt::skip]
        let want = [
            1.0, 2.0, 5.0, 6.0, /* block 1 */ 3.0, 4.0, 7.0, 8.0,
            9.0, 10.0, 0.0, 0.0, /* block 1 */ 11.0, 12.0, 0.0, 0.0,
        ];
        assert_eq!(dst, want);
        pack_row_groups(&src, 4, 1, 3, 2, 2, &mut dst);
        assert_eq!(&dst[..8], [5.0, 6.0, 9.0, 10.0, 7.0, 8.0, 11.0, 12.0]);
    }

    #[test]
    fn packs_column_panels() {
        // 3 rows × 4 columns in blocks of 2; rows 1..3 give two 2 × 2 panels.
        let src: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        let mut dst = LineAligned::default();
        dst.resized(64).fill(f32::NAN);
        pack_column_panels(&src, 4, 1, 3, 2, &mut dst);
        assert_eq!(dst.get(8), [5.0, 6.0, 9.0, 10.0, 7.0, 8.0, 11.0, 12.0]);
        assert!(dst.get(8).as_ptr().addr().is_multiple_of(64));
        pack_column_panels(&src, 4, 0, 3, 2, &mut dst);
        assert_eq!(
            dst.get(12),
            [1.0, 2.0, 5.0, 6.0, 9.0, 10.0, 3.0, 4.0, 7.0, 8.0, 11.0, 12.0]
        );
    }

    #[test]
    fn packs_column_panels_over_several_tasks() {
        // b = 8: 64 panels per task; 80 block-columns make one full task and a partial one.
        let (rows, width, b) = (5, 80 * 8, 8);
        let src: Vec<f32> = (0..rows * width).map(|v| v as f32).collect();
        let mut dst = LineAligned::default();
        pack_column_panels(&src, width, 1, rows, b, &mut dst);
        let h = rows - 1;
        let dst = dst.get(h * width);
        for j in 0..width / b {
            for r in 0..h {
                for k in 0..b {
                    assert_eq!(dst[(j * h + r) * b + k], src[(1 + r) * width + j * b + k]);
                }
            }
        }
    }

    #[test]
    fn gathers_blocks_in_the_given_order() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect(); // three 2 × 2 blocks
        let mut dst = vec![f32::NAN; 2];
        gather_blocks(&src, &[2, 0, 2], 2, &mut dst);
        assert_eq!(
            dst,
            [8.0, 9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 10.0, 11.0]
        );
    }

    #[test]
    fn transposes_every_block() {
        let src: Vec<f32> = (0..128).map(|v| v as f32).collect();
        let mut dst = Vec::new();
        transpose_blocks(&src, 8, &mut dst);
        for blk in 0..2 {
            for r in 0..8 {
                for c in 0..8 {
                    assert_eq!(dst[blk * 64 + c * 8 + r], src[blk * 64 + r * 8 + c]);
                }
            }
        }
    }
}
