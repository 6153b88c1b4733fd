//! The GEMM doorway for bf16 operands: products of `half::bf16` (or mixed bf16 / f32)
//! matrices accumulated in f32 by the f32 kernel of [`super::gemm`].
//!
//! Why this shape: the `gemm` crate has no bf16 kernel and does not expose its packing, so
//! the bf16 operands are converted to f32 *panel by panel* while they are packed for it: the
//! inner dimension is cut into chunks of [`KC`], each chunk's `m × KC` piece of the left
//! operand and `KC × n` piece of the right one are widened into small scratch buffers (in the
//! layout the source is contiguous in, so the reads stay sequential), and the f32 kernel
//! adds their product into the f32 result. No f32 copy of a whole operand is made, and the
//! sum runs in f32 exactly as it does for f32 operands (only its chunking differs). Widening
//! bf16 to f32 is exact (a 16-bit shift), so the only roundings are the f32 sums' and the
//! final store of a bf16 result (round to nearest even).
//!
//! [`Elem`] lets one kernel body serve f32 and bf16 arrays (the MoE kernels are generic over
//! it): for f32 every method is the identity, so the f32 path runs the code it ran before.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::buffers::ZeroBits;
use super::gemm::{matmul, matmul_add, Strided};

// Zero bits are bf16's +0.0.
impl ZeroBits for bf16 {}

/// Inner-dimension chunk of one widened panel pair: `KC × n` f32 of the right operand stays
/// in L2 for the usual widths (256 × 512 × 4 B = 512 KiB) and each kernel call still has a
/// deep enough inner loop to amortise its own packing.
pub(crate) const KC: usize = 256;

/// A strided read-only operand of elements `T`: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// An element type the kernels read and write: f32, or bf16 widened to f32 on load.
pub(crate) trait Elem: ZeroBits + Send + Sync + 'static {
    /// True for f32: operands are used in place, without chunking or copying.
    const IS_F32: bool;

    /// The `rows × cols` block of `v` starting at `(r0, c0)` as an f32 operand: for f32 a
    /// view of the same memory, for bf16 a widened copy in `scratch` (row-major, or
    /// column-major when `v` is contiguous along its rows' direction, `rs == 1`).
    fn block<'s>(
        v: View<'s, Self>,
        row_range: (usize, usize),
        col_range: (usize, usize),
        scratch: &'s mut Vec<f32>,
    ) -> Strided<'s>;

    /// `src` widened to f32: `src` itself for f32, else a copy in `scratch`.
    fn widen<'s>(src: &'s [Self], scratch: &'s mut Vec<f32>) -> &'s [f32];

    /// Runs `f` on an f32 buffer of `dst.len()` elements whose values end up in `dst`: `dst`
    /// itself for f32; for bf16 a scratch buffer (initially zero) rounded into `dst` after.
    fn through_f32(dst: &mut [Self], scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32]));
}

impl Elem for f32 {
    const IS_F32: bool = true;

    fn block<'s>(
        v: View<'s, f32>,
        (r0, rows): (usize, usize),
        (c0, cols): (usize, usize),
        _scratch: &'s mut Vec<f32>,
    ) -> Strided<'s> {
        let start = if rows == 0 || cols == 0 {
            0
        } else {
            r0 * v.rs + c0 * v.cs
        };
        Strided {
            data: &v.data[start.min(v.data.len())..],
            rs: v.rs,
            cs: v.cs,
        }
    }

    fn widen<'s>(src: &'s [f32], _scratch: &'s mut Vec<f32>) -> &'s [f32] {
        src
    }

    fn through_f32(dst: &mut [f32], _scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
        f(dst)
    }
}

impl Elem for bf16 {
    const IS_F32: bool = false;

    fn block<'s>(
        v: View<'s, bf16>,
        (r0, rows): (usize, usize),
        (c0, cols): (usize, usize),
        scratch: &'s mut Vec<f32>,
    ) -> Strided<'s> {
        scratch.clear();
        scratch.reserve(rows * cols);
        let column_major = v.rs == 1 && v.cs != 1;
        if column_major {
            for j in c0..c0 + cols {
                let col = &v.data[j * v.cs + r0..][..rows];
                scratch.extend(col.iter().map(|x| x.to_f32()));
            }
            Strided {
                data: scratch,
                rs: 1,
                cs: rows,
            }
        } else {
            for i in r0..r0 + rows {
                if v.cs == 1 {
                    let row = &v.data[i * v.rs + c0..][..cols];
                    scratch.extend(row.iter().map(|x| x.to_f32()));
                } else {
                    scratch.extend((c0..c0 + cols).map(|j| v.data[i * v.rs + j * v.cs].to_f32()));
                }
            }
            Strided {
                data: scratch,
                rs: cols,
                cs: 1,
            }
        }
    }

    fn widen<'s>(src: &'s [bf16], scratch: &'s mut Vec<f32>) -> &'s [f32] {
        scratch.clear();
        scratch.resize(src.len(), 0.0);
        src.convert_to_f32_slice(scratch);
        scratch
    }

    fn through_f32(dst: &mut [bf16], scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
        scratch.clear();
        scratch.resize(dst.len(), 0.0);
        f(scratch);
        dst.convert_from_f32_slice(scratch);
    }
}

/// Scratch buffers for one thread's widened panels.
#[derive(Default)]
pub(crate) struct Panels {
    lhs: Vec<f32>,
    rhs: Vec<f32>,
}

/// `dst[m × n] (row stride dst_rs) (+)= lhs[m × k] · rhs[k × n]` in f32, for operands of any
/// [`Elem`] type; `accumulate` adds to `dst`'s values. Two f32 operands go straight to the
/// f32 doorway; otherwise the inner dimension is cut into [`KC`]-chunks whose widened
/// panels (in `panels`) are multiplied and summed into `dst`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_elem<A: Elem, B: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: View<'_, A>,
    rhs: View<'_, B>,
    threaded: bool,
    accumulate: bool,
    panels: &mut Panels,
) {
    let step = if A::IS_F32 && B::IS_F32 { k.max(1) } else { KC };
    if k == 0 {
        let (l, r) = (
            A::block(lhs, (0, 0), (0, 0), &mut panels.lhs),
            B::block(rhs, (0, 0), (0, 0), &mut panels.rhs),
        );
        if !accumulate {
            matmul((m, n, 0), dst, dst_rs, l, r, threaded);
        }
        return;
    }
    let mut p0 = 0;
    while p0 < k {
        let kc = step.min(k - p0);
        let l = A::block(lhs, (0, m), (p0, kc), &mut panels.lhs);
        let r = B::block(rhs, (p0, kc), (0, n), &mut panels.rhs);
        if accumulate || p0 > 0 {
            matmul_add((m, n, kc), dst, dst_rs, l, r, threaded);
        } else {
            matmul((m, n, kc), dst, dst_rs, l, r, threaded);
        }
        p0 += kc;
    }
}

/// Rows per block of [`matmul_bf16`]: each block is one task with its own panels and an
/// f32 result of `MC × n` before it is rounded to bf16.
#[cfg_attr(not(feature = "python"), allow(dead_code))] // the dense entry point is Python's
const MC: usize = 128;

/// `out[m × n] = lhs[m × k] · rhs[k × n]` for row-major (or, with `rhs_transposed`,
/// `rhs` stored `[n, k]`) bf16 operands, accumulated in f32 and rounded once into bf16.
/// Blocks of [`MC`] rows run side by side on rayon's threads.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) fn matmul_bf16(
    (m, n, k): (usize, usize, usize),
    lhs: &[bf16],
    rhs: &[bf16],
    rhs_transposed: bool,
    out: &mut [bf16],
) {
    assert!(
        lhs.len() == m * k && rhs.len() == k * n && out.len() == m * n,
        "matmul_bf16: operand lengths do not match {m}x{n}x{k}"
    );
    if m == 0 || n == 0 {
        return;
    }
    let rhs_view = if rhs_transposed {
        View {
            data: rhs,
            rs: 1,
            cs: k,
        }
    } else {
        View {
            data: rhs,
            rs: n,
            cs: 1,
        }
    };
    out.par_chunks_mut(MC * n).enumerate().for_each_init(
        || (Panels::default(), Vec::new()),
        |(panels, acc), (b, dst)| {
            let rows = dst.len() / n;
            let lhs_view = View {
                data: &lhs[b * MC * k..],
                rs: k,
                cs: 1,
            };
            <bf16 as Elem>::through_f32(dst, acc, |d| {
                matmul_elem((rows, n, k), d, n, lhs_view, rhs_view, false, false, panels)
            });
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 251) as f32 / 125.0 - 1.0)
            .collect()
    }

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    /// f64 reference of the product of the bf16 operands (exactly representable in f64).
    fn reference(a: &[bf16], b: &[bf16], m: usize, n: usize, k: usize, bt: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| {
                        let bv = if bt { b[j * k + p] } else { b[p * n + j] };
                        f64::from(a[i * k + p].to_f32()) * f64::from(bv.to_f32())
                    })
                    .sum();
            }
        }
        c
    }

    #[test]
    fn bf16_product_matches_f64_within_one_rounding() {
        // k spans several KC chunks and m several MC blocks, with ragged ends.
        let (m, n, k) = (300, 37, 700);
        let a = to_bf16(&values(m * k, 1));
        for bt in [false, true] {
            let b = to_bf16(&values(k * n, 2));
            let mut out = vec![bf16::ZERO; m * n];
            matmul_bf16((m, n, k), &a, &b, bt, &mut out);
            let want = reference(&a, &b, m, n, k, bt);
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                // One bf16 rounding of the result (2^-8 relative) plus the f32 sum's error,
                // bounded by k · 2^-24 · Σ|a·b| ≤ k · 2^-24 · k here.
                let tol = 2f64.powi(-8) * w.abs() + (k * k) as f64 * 2f64.powi(-24);
                assert!(
                    (f64::from(g.to_f32()) - w).abs() <= tol,
                    "[{i}] {g} vs {w} (transposed rhs: {bt})"
                );
            }
        }
    }

    #[test]
    fn mixed_operands_accumulate_like_f32() {
        let (m, n, k) = (19, 23, 530);
        let a32 = values(m * k, 3);
        let b32 = values(k * n, 4);
        let a16 = to_bf16(&a32);
        let a_widened: Vec<f32> = a16.iter().map(|x| x.to_f32()).collect();
        let mut want = vec![1.0f32; m * n];
        let av = Strided {
            data: &a_widened,
            rs: k,
            cs: 1,
        };
        let bv = Strided {
            data: &b32,
            rs: n,
            cs: 1,
        };
        matmul_add((m, n, k), &mut want, n, av, bv, false);
        let mut got = vec![1.0f32; m * n];
        let mut panels = Panels::default();
        // lhs transposed in memory (rs = 1): the column-major widening path.
        let mut a_t = vec![bf16::ZERO; m * k];
        for i in 0..m {
            for p in 0..k {
                a_t[p * m + i] = a16[i * k + p];
            }
        }
        matmul_elem(
            (m, n, k),
            &mut got,
            n,
            View {
                data: &a_t,
                rs: 1,
                cs: m,
            },
            View {
                data: &b32,
                rs: n,
                cs: 1,
            },
            false,
            true,
            &mut panels,
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "[{i}] {g} vs {w}");
        }
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let mut out = vec![bf16::ONE; 6];
        matmul_bf16((2, 3, 0), &[], &[], false, &mut out);
        assert!(out.iter().all(|x| *x == bf16::ZERO));
    }
}
