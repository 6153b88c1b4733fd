//! Grouped matmul: each expert's contiguous block of rows times that expert's matrix, and the
//! two backward forms.
//!
//! The work is cut into tiles, each one GEMM writing its own contiguous piece of the output
//! (no locks, no atomics; experts with no rows make no tile at all). Tiles of about equal cost
//! run side by side on rayon's threads, one thread each: measured in `benches/moe.rs`
//! (T = 4096, d = 256, E = 8, hidden 512), that beat running each big expert alone with gemm's
//! own threading by 5 % (forward) and 9 % (dx, dW). Only an expert whose rows are too few to
//! cut into a tile per thread but whose GEMM is large is a "solo" tile, run alone with gemm's
//! threading so that it still uses every core.

use super::error::{shape_str, MoeError};
use super::matrix::Matrix;
use super::par::run;
use half::bf16;
use std::mem::MaybeUninit;

use crate::linalg::bf16::{matmul_elem, Elem, Panels, View};
use crate::linalg::buffers::{filled, zeroed};
use crate::linalg::gemm::{matmul_uninit, Strided};

/// A stack of `n` row-major `rows × cols` matrices (`[E, d_in, d_out]` expert weights) of
/// f32 or bf16.
#[derive(Debug, Clone, Copy)]
pub struct MatrixStack<'a, T = f32> {
    data: &'a [T],
    pub(super) n: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl<'a, T> MatrixStack<'a, T> {
    /// Views `data` as `[n, rows, cols]`; `arg` names the argument if the lengths disagree.
    pub fn new(
        arg: &'static str,
        data: &'a [T],
        n: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Self, MoeError> {
        match n.checked_mul(rows).and_then(|x| x.checked_mul(cols)) {
            Some(len) if len == data.len() => Ok(Self {
                data,
                n,
                rows,
                cols,
            }),
            _ => Err(MoeError::shape(
                arg,
                shape_str(&[n, rows, cols]),
                format!("{} elements", data.len()),
            )),
        }
    }

    pub(super) fn matrix(&self, i: usize) -> &'a [T] {
        let size = self.rows * self.cols;
        &self.data[i * size..(i + 1) * size]
    }
}

/// GEMM work (multiply-adds) a tile should carry at least, so per-call overhead (packing the
/// right operand) stays a few percent.
const MIN_TILE_WORK: usize = if cfg!(test) { 1 << 10 } else { 1 << 24 };

/// An expert with at least this much GEMM work (multiply-adds) and too few rows to give every
/// thread a tile is a solo tile: it runs alone, threaded inside gemm.
const SOLO_WORK: usize = 1 << 25;

/// Rows a side-by-side tile should have at least (the micro-kernel's register block).
const MIN_TILE_ROWS: usize = 16;

/// Tiles per thread to aim for, so uneven experts still balance.
const TILES_PER_THREAD: usize = 2;

/// One unit of work: rows `[start, start + len)` of the output of expert `expert`; `solo`
/// tiles (a whole big expert) run one at a time with gemm's threading.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tile {
    pub(super) expert: usize,
    pub(super) start: usize,
    pub(super) len: usize,
    solo: bool,
}

/// Splits each expert's `sizes[e]` output rows into tiles of about equal work, where one
/// output row costs `row_work` multiply-adds for expert e (`row_work(e)`).
fn tiles(sizes: &[usize], row_work: impl Fn(usize) -> usize) -> Vec<Tile> {
    tiles_with(sizes, row_work, SOLO_WORK, TILES_PER_THREAD)
}

/// Tiles for kernels that run every tile side by side, one thread each, and do more than a
/// GEMM per tile (the fused expert FFN: GELU right after the GEMM, while the tile is still
/// in cache): no solo tiles, and `per_thread` tiles per thread so uneven experts balance.
pub(super) fn shared_tiles(
    sizes: &[usize],
    row_work: impl Fn(usize) -> usize,
    per_thread: usize,
) -> Vec<Tile> {
    tiles_with(sizes, row_work, usize::MAX, per_thread)
}

fn tiles_with(
    sizes: &[usize],
    row_work: impl Fn(usize) -> usize,
    solo_work: usize,
    per_thread: usize,
) -> Vec<Tile> {
    let total: usize = sizes
        .iter()
        .enumerate()
        .map(|(e, &n)| n.saturating_mul(row_work(e)))
        .sum();
    let target = (total / (rayon::current_num_threads() * per_thread).max(1)).max(MIN_TILE_WORK);
    let mut out = Vec::new();
    for (expert, &n) in sizes.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let per_row = row_work(expert).max(1);
        let too_few_rows = n < MIN_TILE_ROWS * rayon::current_num_threads();
        if too_few_rows && n.saturating_mul(per_row) >= solo_work {
            out.push(Tile {
                expert,
                start: 0,
                len: n,
                solo: true,
            });
            continue;
        }
        let pieces = (n.saturating_mul(per_row) / target).clamp(1, n);
        // Round the tile height to a multiple of 16 rows (the micro-kernel's register block)
        // when the expert is tall enough.
        let mut height = n.div_ceil(pieces);
        if n >= 32 {
            height = height.div_ceil(16) * 16;
        }
        let mut start = 0;
        while start < n {
            let len = height.min(n - start);
            out.push(Tile {
                expert,
                start,
                len,
                solo: false,
            });
            start += len;
        }
    }
    out
}

/// Splits `buf` (concatenated row-major blocks of `cols` columns) into one mutable piece per
/// tile, where tile rows are offset by `base[tile.expert]`. Tiles must come in increasing,
/// non-overlapping row order, as [`tiles`] makes them.
pub(super) fn split_by_tiles<'b, T>(
    mut buf: &'b mut [T],
    tiles: &[Tile],
    base: &[usize],
    cols: usize,
) -> Vec<(Tile, &'b mut [T])> {
    let mut pos = 0;
    let mut out = Vec::with_capacity(tiles.len());
    for &tile in tiles {
        let begin = (base[tile.expert] + tile.start) * cols;
        let (_, rest) = std::mem::take(&mut buf).split_at_mut(begin - pos);
        let (piece, rest) = rest.split_at_mut(tile.len * cols);
        out.push((tile, piece));
        buf = rest;
        pos = begin + tile.len * cols;
    }
    out
}

/// Runs `gemm(tile, piece, threaded)` for every tile: the solo ones one after the other
/// (threaded inside), then the rest side by side on rayon's threads.
fn execute<T: Send>(
    pieces: Vec<(Tile, &mut [T])>,
    gemm: impl Fn(Tile, &mut [T], bool) + Sync + Send,
) {
    let (solo, shared): (Vec<_>, Vec<_>) = pieces.into_iter().partition(|(t, _)| t.solo);
    for (tile, dst) in solo {
        gemm(tile, dst, true);
    }
    run(shared, |_, (tile, dst)| gemm(tile, dst, false));
}

/// Row offsets of each expert's block: `[0, c0, c0 + c1, …, R]`, after checking `counts`
/// (`E` non-negative entries summing to `rows`).
pub(super) fn offsets(
    counts: &[i32],
    n_experts: usize,
    rows: usize,
    rows_of: &str,
) -> Result<Vec<usize>, MoeError> {
    if counts.len() != n_experts {
        return Err(MoeError::shape(
            "counts",
            format!("[{n_experts}] (experts in w)"),
            format!("[{}]", counts.len()),
        ));
    }
    let mut off = Vec::with_capacity(n_experts + 1);
    let mut sum = 0usize;
    off.push(0);
    for (e, &c) in counts.iter().enumerate() {
        if c < 0 {
            return Err(MoeError::entry(
                "counts",
                &[e],
                "a non-negative row count",
                c,
            ));
        }
        sum = sum.saturating_add(c as usize);
        off.push(sum);
    }
    if sum != rows {
        return Err(MoeError::value(
            "counts",
            format!("entries summing to R = {rows} (rows of {rows_of})"),
            format!("entries summing to {sum}"),
        ));
    }
    Ok(off)
}

/// The expert blocks of `x_sorted` for a product with `w`, after checking that its width is
/// `w`'s `d_in` and that `counts` splits its rows.
fn forward_offsets<T>(
    x_sorted: Matrix<'_, T>,
    counts: &[i32],
    w: MatrixStack<'_, T>,
) -> Result<Vec<usize>, MoeError> {
    if x_sorted.cols() != w.rows {
        return Err(MoeError::shape(
            "x_sorted",
            format!("[R, {}] (d_in of w)", w.rows),
            x_sorted.shape(),
        ));
    }
    offsets(counts, w.n, x_sorted.rows(), "x_sorted")
}

/// The expert blocks of `dy` for a product with `w`ᵀ, after checking that its width is
/// `w`'s `d_out` and that `counts` splits its rows.
fn dx_offsets<T>(
    dy: Matrix<'_, T>,
    counts: &[i32],
    w: MatrixStack<'_, T>,
) -> Result<Vec<usize>, MoeError> {
    if dy.cols() != w.cols {
        return Err(MoeError::shape(
            "dy",
            format!("[R, {}] (d_out of w)", w.cols),
            dy.shape(),
        ));
    }
    offsets(counts, w.n, dy.rows(), "dy")
}

/// `out[R, d_out]`: the rows of expert e in `x_sorted` (`[R, d_in]`, blocks given by
/// `counts`) times `w[e]` (`w`: `[E, d_in, d_out]`).
pub fn grouped_matmul(
    x_sorted: Matrix<'_, f32>,
    counts: &[i32],
    w: MatrixStack<'_>,
) -> Result<Vec<f32>, MoeError> {
    let off = forward_offsets(x_sorted, counts, w)?;
    let d_out = w.cols;
    rows_times_experts("out", x_sorted.data(), (w.rows, d_out), &off, |e| Strided {
        data: w.matrix(e),
        rs: d_out,
        cs: 1,
    })
}

/// `dx[R, d_in]`: the rows of expert e in `dy` (`[R, d_out]`) times `w[e]ᵀ`.
pub fn grouped_matmul_dx(
    dy: Matrix<'_, f32>,
    counts: &[i32],
    w: MatrixStack<'_>,
) -> Result<Vec<f32>, MoeError> {
    let off = dx_offsets(dy, counts, w)?;
    let d_out = w.cols;
    // w[e]ᵀ: element (i, j) of the [d_out, d_in] transpose is w[e][j, i].
    rows_times_experts("dx", dy.data(), (d_out, w.rows), &off, |e| Strided {
        data: w.matrix(e),
        rs: 1,
        cs: d_out,
    })
}

/// `[R, n]`: the rows of expert e in `a` (`[R, k]`, expert blocks at `off`, as [`offsets`]
/// checked them) times `right(e)` (`[k, n]`), into a fresh buffer that is not zeroed first.
fn rows_times_experts<'w>(
    what: &'static str,
    a: &[f32],
    (k, n): (usize, usize),
    off: &[usize],
    right: impl Fn(usize) -> Strided<'w> + Sync,
) -> Result<Vec<f32>, MoeError> {
    let rows = off.last().copied().unwrap_or(0);
    let sizes: Vec<usize> = off.windows(2).map(|p| p[1] - p[0]).collect();
    let work = tiles(&sizes, |_| k * n);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        execute(split_by_tiles(out, &work, off, n), |tile, dst, threaded| {
            let row0 = off[tile.expert] + tile.start;
            let left = Strided {
                data: &a[row0 * k..],
                rs: k,
                cs: 1,
            };
            matmul_uninit((tile.len, n, k), dst, n, left, right(tile.expert), threaded);
        })
    };
    // SAFETY: the tiles cover every row of every expert, and the counts sum to R (checked by
    // `offsets`), so the products write all R · n elements.
    Ok(unsafe { filled(what, rows.saturating_mul(n), fill) }?)
}

/// [`grouped_matmul`] for bf16 rows and weights: products accumulated in f32 (the bf16
/// GEMM doorway, `linalg::bf16`), each output row rounded once to bf16.
pub fn grouped_matmul_bf16(
    x_sorted: Matrix<'_, bf16>,
    counts: &[i32],
    w: MatrixStack<'_, bf16>,
) -> Result<Vec<bf16>, MoeError> {
    let off = forward_offsets(x_sorted, counts, w)?;
    let d_out = w.cols;
    rows_times_experts_bf16("out", x_sorted.data(), (w.rows, d_out), &off, |e| View {
        data: w.matrix(e),
        rs: d_out,
        cs: 1,
    })
}

/// [`grouped_matmul_dx`] for bf16 `dy` and weights (f32 accumulation, bf16 result).
pub fn grouped_matmul_dx_bf16(
    dy: Matrix<'_, bf16>,
    counts: &[i32],
    w: MatrixStack<'_, bf16>,
) -> Result<Vec<bf16>, MoeError> {
    let off = dx_offsets(dy, counts, w)?;
    let d_out = w.cols;
    rows_times_experts_bf16("dx", dy.data(), (d_out, w.rows), &off, |e| View {
        data: w.matrix(e),
        rs: 1,
        cs: d_out,
    })
}

/// [`rows_times_experts`] for bf16: each tile's product is accumulated in an f32 scratch
/// tile and rounded into the bf16 output.
fn rows_times_experts_bf16<'w>(
    what: &'static str,
    a: &[bf16],
    (k, n): (usize, usize),
    off: &[usize],
    right: impl Fn(usize) -> View<'w, bf16> + Sync,
) -> Result<Vec<bf16>, MoeError> {
    let rows = off.last().copied().unwrap_or(0);
    let sizes: Vec<usize> = off.windows(2).map(|p| p[1] - p[0]).collect();
    let work = tiles(&sizes, |_| k * n);
    let mut out = zeroed(what, rows.saturating_mul(n))?;
    execute(
        split_by_tiles(&mut out, &work, off, n),
        |tile, dst, threaded| {
            let row0 = off[tile.expert] + tile.start;
            let left = View {
                data: &a[row0 * k..],
                rs: k,
                cs: 1,
            };
            let mut panels = Panels::default();
            <bf16 as Elem>::through_f32(dst, &mut Vec::new(), |d| {
                matmul_elem(
                    (tile.len, n, k),
                    d,
                    n,
                    left,
                    right(tile.expert),
                    threaded,
                    false,
                    &mut panels,
                )
            });
        },
    );
    Ok(out)
}

/// `dw[E, d_in, d_out]`: `x_eᵀ · dy_e` per expert (rows of expert e in `x_sorted` `[R, d_in]`
/// and `dy` `[R, d_out]`), zeros for experts with no rows.
pub fn grouped_matmul_dw(
    x_sorted: Matrix<'_, f32>,
    dy: Matrix<'_, f32>,
    counts: &[i32],
) -> Result<Vec<f32>, MoeError> {
    dw_of(x_sorted, dy, counts)
}

/// [`grouped_matmul_dw`] for bf16 `x_sorted` and `dy`: the gradient is f32 (it feeds the
/// f32 master weights), accumulated in f32.
pub fn grouped_matmul_dw_bf16(
    x_sorted: Matrix<'_, bf16>,
    dy: Matrix<'_, bf16>,
    counts: &[i32],
) -> Result<Vec<f32>, MoeError> {
    dw_of(x_sorted, dy, counts)
}

fn dw_of<T: Elem>(
    x_sorted: Matrix<'_, T>,
    dy: Matrix<'_, T>,
    counts: &[i32],
) -> Result<Vec<f32>, MoeError> {
    let (rows, d_in, d_out) = (x_sorted.rows(), x_sorted.cols(), dy.cols());
    if dy.rows() != rows {
        return Err(MoeError::shape(
            "dy",
            format!("[{rows}, d_out] (R = rows of x_sorted)"),
            dy.shape(),
        ));
    }
    let e = counts.len();
    let off = offsets(counts, e, rows, "x_sorted")?;
    let mut dw = zeroed("dw", e.saturating_mul(d_in).saturating_mul(d_out))?;
    // Tiles over the d_in rows of each expert's [d_in, d_out] gradient; a row costs n_e · d_out.
    let sizes: Vec<usize> = (0..e)
        .map(|x| if off[x + 1] > off[x] { d_in } else { 0 })
        .collect();
    let base: Vec<usize> = (0..e).map(|x| x * d_in).collect();
    let work = tiles(&sizes, |x| (off[x + 1] - off[x]) * d_out);
    execute(
        split_by_tiles(&mut dw, &work, &base, d_out),
        |tile, dst, threaded| {
            let (r0, n_e) = (off[tile.expert], off[tile.expert + 1] - off[tile.expert]);
            matmul_elem(
                (tile.len, d_out, n_e),
                dst,
                d_out,
                // x_eᵀ restricted to d_in rows [start, start + len): element (i, r) is
                // x_sorted[r0 + r, start + i].
                View {
                    data: &x_sorted.data()[r0 * d_in + tile.start..],
                    rs: 1,
                    cs: d_in,
                },
                View {
                    data: &dy.data()[r0 * d_out..],
                    rs: d_out,
                    cs: 1,
                },
                threaded,
                false,
                &mut Panels::default(),
            );
        },
    );
    Ok(dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ref_forward(x: &[f32], counts: &[i32], w: &[f32], d_in: usize, d_out: usize) -> Vec<f64> {
        let mut out = Vec::new();
        let mut row = 0;
        for (e, &c) in counts.iter().enumerate() {
            for _ in 0..c {
                for j in 0..d_out {
                    out.push(
                        (0..d_in)
                            .map(|i| {
                                f64::from(x[row * d_in + i])
                                    * f64::from(w[(e * d_in + i) * d_out + j])
                            })
                            .sum(),
                    );
                }
                row += 1;
            }
        }
        out
    }

    fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (f64::from(x) - y).abs() <= tol * (1.0 + y.abs()),
                "{i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn forward_and_backward_match_naive_with_empty_experts() {
        let (d_in, d_out) = (13, 7);
        let counts = [5, 0, 40, 1, 0];
        let r: usize = counts.iter().map(|&c| c as usize).sum();
        let x: Vec<f32> = (0..r * d_in)
            .map(|i| ((i * 31 % 17) as f32) / 8.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..counts.len() * d_in * d_out)
            .map(|i| ((i * 7 % 19) as f32) / 9.0 - 1.0)
            .collect();
        let xs = Matrix::new("x", &x, r, d_in).unwrap();
        let ws = MatrixStack::new("w", &w, counts.len(), d_in, d_out).unwrap();
        let y = grouped_matmul(xs, &counts, ws).unwrap();
        close(&y, &ref_forward(&x, &counts, &w, d_in, d_out), 1e-5);

        let dy: Vec<f32> = (0..r * d_out)
            .map(|i| ((i * 11 % 23) as f32) / 10.0 - 1.0)
            .collect();
        let dym = Matrix::new("dy", &dy, r, d_out).unwrap();
        // dx = dy · wᵀ is the forward with the transposed stack.
        let mut wt = vec![0.0f32; w.len()];
        for e in 0..counts.len() {
            for i in 0..d_in {
                for j in 0..d_out {
                    wt[(e * d_out + j) * d_in + i] = w[(e * d_in + i) * d_out + j];
                }
            }
        }
        let dx = grouped_matmul_dx(dym, &counts, ws).unwrap();
        close(&dx, &ref_forward(&dy, &counts, &wt, d_out, d_in), 1e-5);

        let dw = grouped_matmul_dw(xs, dym, &counts).unwrap();
        let mut row = 0;
        for (e, &c) in counts.iter().enumerate() {
            for i in 0..d_in {
                for j in 0..d_out {
                    let want: f64 = (row..row + c as usize)
                        .map(|q| f64::from(x[q * d_in + i]) * f64::from(dy[q * d_out + j]))
                        .sum();
                    let got = dw[(e * d_in + i) * d_out + j];
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{e} {i} {j}"
                    );
                }
            }
            row += c as usize;
        }
    }

    #[test]
    fn tiles_cover_every_row_once() {
        for sizes in [vec![0usize, 3, 0], vec![1000, 1, 4097], vec![]] {
            let mut t = tiles(&sizes, |_| 1 << 16);
            let shared = shared_tiles(&sizes, |_| 1 << 16, 8);
            assert!(shared.iter().all(|t| !t.solo));
            t.extend(shared.iter().map(|t| Tile {
                expert: t.expert + sizes.len(),
                ..*t
            }));
            let sizes: Vec<usize> = sizes.iter().chain(&sizes).copied().collect();
            for (e, &n) in sizes.iter().enumerate() {
                let mut covered = 0;
                for tile in t.iter().filter(|t| t.expert == e) {
                    assert_eq!(tile.start, covered);
                    covered += tile.len;
                }
                assert_eq!(covered, n);
            }
        }
    }

    #[test]
    fn only_big_experts_with_few_rows_run_solo() {
        // 4 rows of a huge GEMM cannot give every thread a tile: one solo tile, gemm threads it.
        let few = tiles(&[4], |_| 1 << 24);
        assert!(few.len() == 1 && few[0].solo && few[0].len == 4);
        // Enough rows: side-by-side tiles, however big the expert.
        let many = tiles(&[4096], |_| 1 << 24);
        assert!(many.len() > 1 && many.iter().all(|t| !t.solo));
    }

    #[test]
    fn rejects_inconsistent_counts() {
        let x = [0.0f32; 6];
        let w = [0.0f32; 4];
        let xs = Matrix::new("x", &x, 3, 2).unwrap();
        let ws = MatrixStack::new("w", &w, 2, 2, 1).unwrap();
        let err = grouped_matmul(xs, &[2, 2], ws).unwrap_err();
        assert_eq!(err.to_string(), "counts: expected entries summing to R = 3 (rows of x_sorted), got entries summing to 4");
        let err = grouped_matmul(xs, &[4, -1], ws).unwrap_err();
        assert_eq!(
            err.to_string(),
            "counts[1]: expected a non-negative row count, got -1"
        );
        let err = grouped_matmul(xs, &[3], ws).unwrap_err();
        assert!(matches!(err, MoeError::Shape { arg: "counts", .. }));
        let err = grouped_matmul_dw(xs, Matrix::new("dy", &x, 2, 3).unwrap(), &[3]).unwrap_err();
        assert!(matches!(err, MoeError::Shape { arg: "dy", .. }));
    }
}
