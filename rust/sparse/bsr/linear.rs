//! Forward `y = x·wᵀ (+ bias)` and input gradient `dx = dy·w` over the stored blocks only.
//!
//! Loop order (forward): the stored blocks are transposed once (`Wᵀ_ij`, so the micro-kernel
//! reads B-wide output rows contiguously). Rows of `x` are taken in super-panels that fit the
//! last-level cache; each super-panel is packed once into groups of `MR` rows (each group's
//! `MR × B` sub-block of every block-column contiguous, so the kernel streams one contiguous
//! run per block instead of `MR` rows on as many pages), while the super-panel before it is
//! computed ([`pipeline`]). The computation is one task per output block-row `i` (each owns
//! the output columns `i·B .. i·B + B`) sweeping the groups, accumulating
//! `x[:, j-block] · Wᵀ_ij` over all the blocks of the row in registers before storing each
//! output tile once.
//!
//! dX is the same with the roles turned: one task per input block-column `j` (through the
//! pattern's transposed index), `dx[:, j-block] = Σ_i dy[:, i-block] · W_ij`, its blocks
//! gathered once in block-column order. Both run the one sweep of [`PanelProduct`].

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::error::{BsrError, Result};
use super::kernels::{panel_kernel, Isa, PanelArgs, PanelKernel};
use super::pack::{
    gather_blocks, pack_row_groups, pipeline, transpose_blocks, with_workspace, Stage,
};
use super::pattern::BsrPattern;
use crate::linalg::buffers::{as_uninit, fault_in, filled};

/// Bytes of the row-major operand (`x` or `dy`) one pass over all block-rows may sweep. The
/// packed copy stays in the last-level cache even when other processes share it; measured at
/// N = 4096, B = 32: 2 MiB beat 8 MiB by ~10 % on a loaded machine, 1 MiB was no better.
const SUPERPANEL_BYTES: usize = 2 << 20;

/// Outputs at least this large are fresh pages from the OS on every call: glibc serves them
/// with `mmap` whatever was freed before (its adaptive threshold stops at 32 MiB).
const FRESH_FROM_OS_BYTES: usize = 32 << 20;

/// How a product sweeps the rows of its row-major operand, and what it knows of its output.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sweep {
    /// Bytes of the row-major operand per super-panel.
    pub superpanel_bytes: usize,
    /// The output is fresh memory: the pages of each super-panel's output rows are faulted in
    /// while the super-panel before is computed. Otherwise the computing tasks fault them in
    /// themselves, and both threads wait while the OS zeroes the page they share (about
    /// 10 ms of a 65 ms product at N = 4096).
    pub fault_in_output: bool,
}

impl Sweep {
    /// Into a caller's buffer, which is presumably mapped already.
    const CALLER_OUTPUT: Sweep = Sweep {
        superpanel_bytes: SUPERPANEL_BYTES,
        fault_in_output: false,
    };

    /// Into a new buffer of `len` floats.
    fn new_output(len: usize) -> Sweep {
        Sweep {
            superpanel_bytes: SUPERPANEL_BYTES,
            fault_in_output: len.saturating_mul(4) >= FRESH_FROM_OS_BYTES,
        }
    }
}

/// `y = x·wᵀ (+ bias)`: `x` is `[n, cols]`, `y` is `[n, rows]` (both row-major), `w` is the
/// pattern with its `data` (`[nnzb, B, B]`), `bias` has `rows` entries. Every element of `y` is
/// written. Runs on the rayon pool with the best kernels this CPU has.
pub fn bsr_linear(
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    bsr_linear_with(Isa::detect(), x, n, pattern, data, bias, y)
}

/// [`bsr_linear`] with an explicit instruction set (it must be supported by this CPU;
/// an unsupported one falls back to the best supported).
pub fn bsr_linear_with(
    isa: Isa,
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    forward_swept(isa, x, n, pattern, data, bias, y, Sweep::CALLER_OUTPUT)
}

/// [`bsr_linear_with`] with an explicit [`Sweep`] (so that tests can cross super-panel
/// boundaries on small shapes, and fault the output in ahead).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_swept(
    isa: Isa,
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    sweep: Sweep,
) -> Result<()> {
    check_forward(x, n, pattern, data, bias)?;
    check_len("y", y.len(), n, pattern.rows(), "n × rows")?;
    forward(isa, x, n, pattern, data, bias, as_uninit(y), sweep);
    Ok(())
}

/// [`bsr_linear`] into a new `[n, rows]` vector, which is never zeroed first (the kernel
/// writes every element, and a memset of the output would cost a visible share of the call).
pub fn bsr_linear_vec(
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check_forward(x, n, pattern, data, bias)?;
    let len = n.saturating_mul(pattern.rows());
    let fill = |y: &mut [MaybeUninit<f32>]| {
        forward(
            Isa::detect(),
            x,
            n,
            pattern,
            data,
            bias,
            y,
            Sweep::new_output(len),
        );
    };
    // SAFETY: the inputs are valid (checked above) and `forward` writes every element of `y`.
    Ok(unsafe { filled("y", len, fill) }?)
}

fn check_forward(
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    bias: Option<&[f32]>,
) -> Result<()> {
    check_len("x", x.len(), n, pattern.cols(), "n × cols")?;
    check_blocks("data", data, pattern)?;
    if let Some(bias) = bias {
        check_len("bias", bias.len(), 1, pattern.rows(), "rows")?;
    }
    Ok(())
}

/// The forward product on inputs [`check_forward`] accepted, into `y` of `n × rows` elements,
/// every one of which it writes (see [`panel_product`]; a block-row that keeps no block gets
/// the bias, or zeros).
#[allow(clippy::too_many_arguments)]
fn forward(
    isa: Isa,
    x: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    sweep: Sweep,
) {
    let (cols, b) = (pattern.cols(), pattern.block());
    if n == 0 {
        return;
    }
    with_workspace(|ws| {
        // The blocks transposed (`Wᵀ_ij`), in id order: each block-row's are one run.
        transpose_blocks(data, b, &mut ws.wt);
        let product = PanelProduct {
            kernel: panel_kernel(usable(isa), b),
            a: x,
            width: cols,
            n,
            block: b,
            blocks: &ws.wt[..data.len()],
            tasks: pattern.block_rows(),
            sweep,
        };
        product.run(y, &mut ws.stages, |i| {
            let blocks = pattern.indptr()[i]..pattern.indptr()[i + 1];
            Terms {
                a_blocks: &pattern.indices()[blocks.clone()],
                first_block: blocks.start,
                init: bias.map(|bias| &bias[i * b..(i + 1) * b]),
            }
        });
    });
}

/// `dx = dy·w`: `dy` is `[n, rows]`, `dx` is `[n, cols]`; every element of `dx` is written.
pub fn bsr_linear_dx(
    dy: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    bsr_linear_dx_with(Isa::detect(), dy, n, pattern, data, dx)
}

/// [`bsr_linear_dx`] with an explicit instruction set.
pub fn bsr_linear_dx_with(
    isa: Isa,
    dy: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    dx: &mut [f32],
) -> Result<()> {
    dx_swept(isa, dy, n, pattern, data, dx, Sweep::CALLER_OUTPUT)
}

/// [`bsr_linear_dx_with`] with an explicit [`Sweep`].
pub(crate) fn dx_swept(
    isa: Isa,
    dy: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    dx: &mut [f32],
    sweep: Sweep,
) -> Result<()> {
    check_dx(dy, n, pattern, data)?;
    check_len("dx", dx.len(), n, pattern.cols(), "n × cols")?;
    input_grad(isa, dy, n, pattern, data, as_uninit(dx), sweep);
    Ok(())
}

/// [`bsr_linear_dx`] into a new `[n, cols]` vector, never zeroed first.
pub fn bsr_linear_dx_vec(
    dy: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
) -> Result<Vec<f32>> {
    check_dx(dy, n, pattern, data)?;
    let len = n.saturating_mul(pattern.cols());
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        input_grad(
            Isa::detect(),
            dy,
            n,
            pattern,
            data,
            dx,
            Sweep::new_output(len),
        );
    };
    // SAFETY: the inputs are valid (checked above) and `input_grad` writes every element.
    Ok(unsafe { filled("dx", len, fill) }?)
}

fn check_dx(dy: &[f32], n: usize, pattern: &BsrPattern, data: &[f32]) -> Result<()> {
    check_len("dy", dy.len(), n, pattern.rows(), "n × rows")?;
    check_blocks("data", data, pattern)
}

/// `values` (the weights' `data`, or dW) must hold `nnzb × B × B` values; `arg` names it.
pub(crate) fn check_blocks(arg: &'static str, values: &[f32], pattern: &BsrPattern) -> Result<()> {
    let b = pattern.block();
    check_len(
        arg,
        values.len(),
        pattern.nnzb(),
        b * b,
        "nnzb × block × block",
    )
}

/// `dx = dy·w` on inputs [`check_dx`] accepted, into `dx` of `n × cols` elements, every one of
/// which it writes (see [`panel_product`]; an empty block-column gets zeros).
fn input_grad(
    isa: Isa,
    dy: &[f32],
    n: usize,
    pattern: &BsrPattern,
    data: &[f32],
    dx: &mut [MaybeUninit<f32>],
    sweep: Sweep,
) {
    let (rows, b) = (pattern.rows(), pattern.block());
    if n == 0 {
        return;
    }
    with_workspace(|ws| {
        // The blocks in block-column order, so each column's are one contiguous run (read in
        // place they are one page each, scattered over `data`).
        gather_blocks(data, pattern.blocks_by_column(), b, &mut ws.wt);
        let product = PanelProduct {
            kernel: panel_kernel(usable(isa), b),
            a: dy,
            width: rows,
            n,
            block: b,
            blocks: &ws.wt[..data.len()],
            tasks: pattern.block_cols(),
            sweep,
        };
        product.run(dx, &mut ws.stages, |j| Terms {
            a_blocks: pattern.column(j).0,
            first_block: pattern.column_range(j).start,
            init: None,
        });
    });
}

/// What the output block-column task `t` of a [`PanelProduct`] sums: `a_blocks[k]` is the
/// block-column of A multiplied by block `first_block + k` of the product's `blocks`, and the
/// sum starts from `init` (`B` values, one per output column) or from zero.
struct Terms<'a> {
    a_blocks: &'a [u32],
    first_block: usize,
    init: Option<&'a [f32]>,
}

/// The sweep that forward and dX share: `out[:, t·B .. t·B + B] = init_t + Σ_k
/// a[:, a_blocks[k]·B ..][.., ..B] · blocks[first_block + k]` for every task `t < tasks`, where
/// `a` is row-major `[n, width]`, `out` is `[n, tasks·B]` and `blocks` are `B × B` row-major
/// (already transposed or gathered by the caller so that each task's are one run).
///
/// Rows of `a` are taken in super-panels (see [`Sweep`]), each packed into row groups while
/// the one before is computed ([`pipeline`]). Within one, one parallel task per output
/// block-column sweeps the groups, accumulating all its terms in registers before storing
/// each output tile once; so every element of `out` is written exactly once.
struct PanelProduct<'a> {
    kernel: PanelKernel,
    a: &'a [f32],
    width: usize,
    n: usize,
    block: usize,
    blocks: &'a [f32],
    tasks: usize,
    sweep: Sweep,
}

impl PanelProduct<'_> {
    fn run<'t>(
        &self,
        out: &mut [MaybeUninit<f32>],
        stages: &mut [Stage; 2],
        terms: impl Fn(usize) -> Terms<'t> + Sync,
    ) {
        let (kernel, b, n, width) = (self.kernel, self.block, self.n, self.width);
        let out_width = self.tasks * b;
        assert_eq!(out.len(), n * out_width, "out: n × tasks·B elements");
        assert_eq!(self.a.len(), n * width, "a: n × width elements");
        if n == 0 || out_width == 0 {
            return;
        }
        let c = SharedOut(out.as_mut_ptr().cast::<f32>());
        let spans = superpanels(n, width, kernel.mr, self.sweep.superpanel_bytes);
        let pack = |(n0, n1), stage: &mut Stage| {
            pack_row_groups(self.a, width, n0, n1, kernel.mr, b, &mut stage.packed);
            if self.sweep.fault_in_output {
                // SAFETY: rows n0..n1 of out (n1 ≤ n) are written by no task until this
                // super-panel is computed, which starts after this packing returns.
                unsafe { fault_in(c.offset(n0 * out_width), (n1 - n0) * out_width) };
            }
        };
        pipeline(&spans, stages, pack, |(n0, n1), stage| {
            let packed = &stage.packed[..];
            (0..self.tasks).into_par_iter().for_each(|t| {
                let Terms {
                    a_blocks,
                    first_block,
                    init,
                } = terms(t);
                // What makes the kernel's reads below in bounds (the pattern was validated,
                // so these hold; checked once per task, cheap beside its tiles).
                assert!(first_block + a_blocks.len() <= self.blocks.len() / (b * b));
                assert!(a_blocks.iter().all(|&j| (j as usize) < width / b));
                assert!(init.is_none_or(|init| init.len() == b));
                let init = init.map_or(std::ptr::null(), <[f32]>::as_ptr);
                for g in (n0..n1).step_by(kernel.mr) {
                    for c0 in (0..b).step_by(kernel.nr) {
                        let args = PanelArgs {
                            a: packed[(g - n0) * width..].as_ptr(),
                            rows: kernel.mr.min(n1 - g),
                            a_blocks,
                            // SAFETY (pointer arithmetic): first_block ≤ the number of blocks
                            // (asserted above).
                            b: unsafe { self.blocks.as_ptr().add(first_block * b * b) },
                            c0,
                            init,
                            // SAFETY (pointer arithmetic): row g < n, column t·B < out_width.
                            c: unsafe { c.offset(g * out_width + t * b) },
                            ldc: out_width,
                        };
                        // SAFETY: the kernel matches a supported ISA (`usable`). Reads: the
                        // packed group holds width·MR floats and every a_block < width/B; the
                        // task's blocks are consecutive in `blocks` from first_block (asserted);
                        // init, when not null, has B floats. Writes: rows g..g+rows ≤ n1 ≤ n,
                        // columns t·B+c0 .. t·B+c0+nr ≤ (t+1)·B ≤ out_width. Tasks differ in t,
                        // so their written columns are disjoint.
                        unsafe { (kernel.run)(&args) };
                    }
                }
            });
        });
    }
}

/// The row ranges swept by one parallel pass: about `bytes` of a row-major `[n, width]`
/// operand each, a multiple of the tile height `mr`.
pub(crate) fn superpanels(n: usize, width: usize, mr: usize, bytes: usize) -> Vec<(usize, usize)> {
    let per = (bytes / (width.max(1) * 4)).max(mr);
    let per = per.div_ceil(mr) * mr;
    (0..n)
        .step_by(per)
        .map(|n0| (n0, (n0 + per).min(n)))
        .collect()
}

/// The requested instruction set when this CPU supports it, else the best one it does.
pub(crate) fn usable(isa: Isa) -> Isa {
    if isa.is_supported() {
        isa
    } else {
        Isa::detect()
    }
}

pub(crate) fn check_len(
    arg: &'static str,
    actual: usize,
    a: usize,
    b: usize,
    shape: &str,
) -> Result<()> {
    let expected = a.checked_mul(b).ok_or_else(|| BsrError::Length {
        arg,
        shape: format!("{shape} = {a} × {b} overflows"),
        expected: usize::MAX,
        actual,
    })?;
    if actual != expected {
        return Err(BsrError::Length {
            arg,
            shape: format!("{shape} = {a} × {b}"),
            expected,
            actual,
        });
    }
    Ok(())
}

/// The output base pointer shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub *mut f32);

impl SharedOut {
    /// The pointer `offset` floats past the base (a method, so closures capture the whole
    /// `Send` wrapper rather than the raw pointer field).
    ///
    /// # Safety
    /// `offset` must stay inside the allocation the base pointer came from.
    pub(crate) unsafe fn offset(self, offset: usize) -> *mut f32 {
        // SAFETY: guaranteed by the caller.
        unsafe { self.0.add(offset) }
    }
}
// SAFETY: every driver that shares a `SharedOut` between rayon tasks has each task write a
// region disjoint from every other task's (argued at each use), and the borrow it came from
// outlives the parallel section.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}
