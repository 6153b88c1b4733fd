//! The whole compression step: selection with error feedback (or DGC momentum correction)
//! fused into the selecting pass, then encoding, then the sent entries' residuals.

use super::codec::{encode_checked, Encoding, Rounding, ValueFormat};
use super::pieces::Pieces;
use super::scan::{Grad, Selection, Sweep};
use super::select::{select_sweep, Method};
use super::CompressError;
use rayon::prelude::*;
use std::cell::RefCell;

/// The state carried from one step to the next for one tensor.
pub enum Feedback<'a> {
    /// No memory: what is not sent is dropped.
    None,
    /// Error feedback: the residual r of everything not sent (and of the encoding's loss).
    Residual(&'a mut [f32]),
    /// DGC momentum correction: velocity `u` and accumulator `v`, momentum `m`.
    Momentum {
        u: &'a mut [f32],
        v: &'a mut [f32],
        m: f32,
    },
}

impl Feedback<'_> {
    fn check_len(&self, n: usize) -> Result<(), CompressError> {
        let mut bufs: Vec<(&'static str, usize)> = Vec::new();
        match self {
            Feedback::None => {}
            Feedback::Residual(r) => bufs.push(("residual", r.len())),
            Feedback::Momentum { u, v, .. } => {
                bufs.push(("momentum velocity", u.len()));
                bufs.push(("momentum accumulator", v.len()));
            }
        }
        match bufs.into_iter().find(|&(_, len)| len != n) {
            Some((what, got)) => Err(CompressError::LengthMismatch {
                what,
                got,
                expected: n,
            }),
            None => Ok(()),
        }
    }
}

/// Compresses `grad` to a payload carrying k entries, updating `feedback` in place:
/// - `None`: select on `grad`.
/// - `Residual(r)`: `r ← r + grad`, select on `r`, then `r[i] ← r[i] − decoded(r[i])` at the
///   sent entries (zero for f32 values).
/// - `Momentum { u, v, m }`: `u ← m·u + grad; v ← v + u`, select on `v`, then at the sent
///   entries `v[i] ← v[i] − decoded(v[i])` and `u[i] ← 0`.
///
/// `grad` is only read. A non-finite gradient is an error that leaves the state as it was
/// (momentum: checked before the update; error feedback: checked per sub-block during the
/// update, which is then undone, `r + g − g`, exact but for float32 rounding); if the state
/// itself overflows float32 it is reset to zeros and the error says so.
pub fn compress_topk(
    grad: &[f32],
    feedback: Feedback<'_>,
    k: usize,
    method: Method,
    encoding: &Encoding,
) -> Result<Vec<u8>, CompressError> {
    // The whole step runs on a pool thread: its parallel passes then start from inside the
    // pool, instead of each being injected from outside and waited for (several per step).
    rayon::scope(|_| compress_in_pool(Grad::Flat(grad), feedback, k, method, encoding))
}

/// [`compress_topk`] with error feedback of the concatenation of `pieces` (a bucket's
/// gradients, in order), read in place: the same payload and residual as compressing
/// `pieces.concat()` with `Feedback::Residual(residual)`, without writing the concatenation.
pub fn compress_topk_pieces(
    pieces: &[&[f32]],
    residual: &mut [f32],
    k: usize,
    method: Method,
    encoding: &Encoding,
) -> Result<Vec<u8>, CompressError> {
    let pieces = Pieces::new(pieces);
    rayon::scope(|_| {
        compress_in_pool(
            Grad::Pieces(&pieces),
            Feedback::Residual(residual),
            k,
            method,
            encoding,
        )
    })
}

fn compress_in_pool(
    grad: Grad<'_>,
    feedback: Feedback<'_>,
    k: usize,
    method: Method,
    encoding: &Encoding,
) -> Result<Vec<u8>, CompressError> {
    let n = grad.len();
    encoding.validate_for(n, k)?;
    feedback.check_len(n)?;
    if let Feedback::Momentum { m, .. } = feedback {
        if !(m.is_finite() && m >= 0.0) {
            return Err(CompressError::InvalidArgument(format!(
                "momentum must be finite and >= 0, got {m}"
            )));
        }
    }
    let stateful = !matches!(feedback, Feedback::None);
    if let Feedback::Momentum { .. } = feedback {
        // Momentum's update cannot be undone, so the gradient is checked before it starts.
        // (Error feedback checks each sub-block inside its single pass and undoes.)
        if let Some(index) = grad.first_nonfinite() {
            return Err(CompressError::NonFinite {
                what: "gradient",
                index,
                value: grad.get(index).unwrap_or(f32::NAN),
            });
        }
    }
    let mut sweep = match (feedback, grad) {
        (Feedback::Residual(acc), grad) => Sweep::Accumulate { grad, acc },
        (Feedback::None, Grad::Flat(grad)) => Sweep::Read(grad),
        (Feedback::Momentum { u, v, m }, Grad::Flat(grad)) => Sweep::Momentum { grad, u, v, m },
        // Only `compress_topk_pieces` makes pieces, always with a residual.
        (_, Grad::Pieces(_)) => {
            return Err(CompressError::InvalidArgument(
                "pieces are compressed with error feedback only".into(),
            ))
        }
    };
    let what = if stateful { OVERFLOW } else { "gradient" };
    // The selection's buffers are reused from step to step (fresh ones cost a page fault
    // per 4 KiB); a nested call on the same thread gets fresh ones.
    SELECTED.with(|kept| match kept.try_borrow_mut() {
        Ok(mut selected) => {
            let done = step(&mut sweep, k, method, what, encoding, &mut selected);
            if selected.idx.capacity() > KEEP_SELECTED {
                *selected = Selection::default();
            }
            done
        }
        Err(_) => step(
            &mut sweep,
            k,
            method,
            what,
            encoding,
            &mut Selection::default(),
        ),
    })
}

thread_local! {
    static SELECTED: RefCell<Selection> = RefCell::new(Selection::default());
}

/// Largest selection (elements) whose buffers are kept for the next step.
const KEEP_SELECTED: usize = 1 << 22;

/// Selection into `selected`, encoding, and the sent entries' state.
fn step(
    sweep: &mut Sweep<'_>,
    k: usize,
    method: Method,
    what: &'static str,
    encoding: &Encoding,
    selected: &mut Selection,
) -> Result<Vec<u8>, CompressError> {
    let n = sweep.len();
    if let Err(e) = select_sweep(sweep, k, method, what, selected) {
        if matches!(e, CompressError::NonFinite { what: OVERFLOW, .. }) {
            reset(sweep);
        }
        return Err(e);
    }
    let (indices, values) = (&selected.idx, &selected.val);
    let stateful = !matches!(sweep, Sweep::Read(_));
    // f32 values decode exactly, so the sent entries' state is plain zero.
    let lossy = stateful && encoding.values != ValueFormat::F32;
    let mut decoded = Vec::new();
    let payload = encode_checked(
        n,
        indices,
        values,
        encoding,
        Rounding::Nearest,
        lossy.then_some(&mut decoded),
    )?;
    let left = |j: usize| if lossy { values[j] - decoded[j] } else { 0.0 };
    match sweep {
        Sweep::Read(_) => {}
        Sweep::Accumulate { acc, .. } => {
            for_sent(acc, indices, |j, a| *a = left(j));
        }
        Sweep::Momentum { u, v: acc, .. } => {
            for_sent(acc, indices, |j, a| *a = left(j));
            for_sent(u, indices, |_, u| *u = 0.0);
        }
    }
    Ok(payload)
}

/// Calls `set(j, &mut state[indices[j]])` for every j. The sent entries are scattered over
/// the whole state (a cache miss each), so chunks of them run in parallel: increasing indices
/// cut `state` into disjoint ranges, one per chunk.
fn for_sent(state: &mut [f32], indices: &[u32], set: impl Fn(usize, &mut f32) + Sync) {
    const CHUNK: usize = 1 << 13;
    let mut pieces = Vec::with_capacity(indices.len().div_ceil(CHUNK));
    let (mut rest, mut offset) = (state, 0usize);
    for (c, chunk) in indices.chunks(CHUNK).enumerate() {
        let end = chunk.last().map_or(offset, |&i| i as usize + 1);
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(end - offset);
        pieces.push((c * CHUNK, chunk, head, offset));
        (rest, offset) = (tail, end);
    }
    let run = |(first, chunk, head, offset): (usize, &[u32], &mut [f32], usize)| {
        for (j, &i) in chunk.iter().enumerate() {
            set(first + j, &mut head[i as usize - offset]);
        }
    };
    if pieces.len() > 1 {
        pieces.into_par_iter().for_each(run);
    } else {
        pieces.into_iter().for_each(run);
    }
}

/// How a non-finite accumulated value (as opposed to a non-finite gradient) is reported.
const OVERFLOW: &str =
    "error-feedback accumulator (float32 overflow; the state was reset to zeros)";

fn reset(sweep: &mut Sweep<'_>) {
    match sweep {
        Sweep::Read(_) => {}
        Sweep::Accumulate { acc, .. } => acc.fill(0.0),
        Sweep::Momentum { u, v, .. } => {
            u.fill(0.0);
            v.fill(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::{IndexFormat, ValueFormat};
    use super::super::dense::{decompress_into, Write};
    use super::super::rng::uniform;
    use super::*;

    fn grad(n: usize, step: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| (uniform(step, i) - 0.5) * (1.0 + (i % 7) as f32))
            .collect()
    }

    fn encoding(values: ValueFormat) -> Encoding {
        Encoding {
            index: None,
            values,
            chunk: 64,
        }
    }

    #[test]
    fn error_feedback_conserves_mass() {
        let n = 20_000;
        let k = 200;
        for values in [ValueFormat::F32, ValueFormat::F16, ValueFormat::Int8] {
            let mut r = vec![0f32; n];
            let mut sent = vec![0f64; n];
            let mut total = vec![0f64; n];
            let mut dense = vec![0f32; n];
            for step in 0..100 {
                let g = grad(n, step);
                let method = Method::Sampled {
                    seed: step,
                    exact_k: true,
                };
                let p = compress_topk(&g, Feedback::Residual(&mut r), k, method, &encoding(values))
                    .unwrap();
                decompress_into(&p, &mut dense, Write::Overwrite).unwrap();
                for i in 0..n {
                    sent[i] += f64::from(dense[i]);
                    total[i] += f64::from(g[i]);
                }
            }
            // Each step rounds r + g once in f32: allow 100 roundings of the running size.
            for i in 0..n {
                let lhs = sent[i] + f64::from(r[i]);
                let tol = 100.0 * 6e-8 * (total[i].abs() + 10.0);
                assert!(
                    (lhs - total[i]).abs() <= tol,
                    "{values:?} i={i}: {lhs} vs {}",
                    total[i]
                );
            }
        }
    }

    #[test]
    fn reused_selection_buffers_do_not_leak_between_steps() {
        // A large step, then smaller ones (and k = 0): each payload holds exactly its own
        // step's top-k, whatever the thread's kept buffers held before.
        let g = grad(300_000, 9);
        let e = encoding(ValueFormat::F32);
        for (step, k) in [(0u64, 30_000usize), (1, 7), (2, 0), (3, 2_000)] {
            let method = Method::Sampled {
                seed: step,
                exact_k: true,
            };
            let p = compress_topk(&g, Feedback::None, k, method, &e).unwrap();
            let mut out = vec![0f32; g.len()];
            decompress_into(&p, &mut out, Write::Overwrite).unwrap();
            let got: Vec<u32> = (0..g.len() as u32)
                .filter(|&i| out[i as usize] != 0.0)
                .collect();
            let want = super::super::select::select_topk(&g, k, Method::Exact).unwrap();
            assert_eq!(got, want, "k = {k}");
        }
    }

    #[test]
    fn pieces_compress_exactly_as_their_concatenation() {
        // Pieces of uneven sizes (empty ones too, and task boundaries falling inside
        // pieces), over several steps, for both methods: payload and residual bit for bit.
        let n = 3 * (1 << 16) + 12_345;
        let cuts = [0usize, 7, 7, 70_000, 131_071, 131_072, 150_000, n];
        let e = encoding(ValueFormat::F32);
        for method in [
            Method::Exact,
            Method::Sampled {
                seed: 5,
                exact_k: true,
            },
        ] {
            let (mut r_flat, mut r_pieces) = (vec![0f32; n], vec![0f32; n]);
            for step in 0..3 {
                let g = grad(n, step);
                let pieces: Vec<&[f32]> = cuts.windows(2).map(|w| &g[w[0]..w[1]]).collect();
                let want =
                    compress_topk(&g, Feedback::Residual(&mut r_flat), 900, method, &e).unwrap();
                let got = compress_topk_pieces(&pieces, &mut r_pieces, 900, method, &e).unwrap();
                assert_eq!(got, want, "{method:?} step {step}");
                assert_eq!(r_pieces, r_flat, "{method:?} step {step}");
            }
        }
    }

    #[test]
    fn a_non_finite_piece_is_reported_at_its_global_index_and_undone() {
        let n = 2 * (1 << 16) + 100;
        let mut g = grad(n, 1);
        g[(1 << 16) + 50] = f32::NAN;
        let pieces: Vec<&[f32]> = vec![&g[..1000], &g[1000..(1 << 16) + 60], &g[(1 << 16) + 60..]];
        let before: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.5).collect();
        let mut r = before.clone();
        let err = compress_topk_pieces(
            &pieces,
            &mut r,
            10,
            Method::Exact,
            &encoding(ValueFormat::F32),
        )
        .unwrap_err();
        assert!(
            matches!(err, CompressError::NonFinite { index, .. } if index == (1 << 16) + 50),
            "{err}"
        );
        for (i, (&a, &b)) in r.iter().zip(&before).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "residual {i} changed: {a} vs {b}"
            );
        }
        let mut short = vec![0f32; n - 1];
        assert!(compress_topk_pieces(
            &pieces,
            &mut short,
            10,
            Method::Exact,
            &encoding(ValueFormat::F32)
        )
        .is_err());
    }

    #[test]
    fn residual_is_the_unsent_accumulation() {
        let g = vec![3.0f32, -1.0, 0.5, -4.0, 2.0];
        let mut r = vec![0.5f32, 0.0, 0.0, 0.0, -2.5];
        let e = Encoding {
            index: Some(IndexFormat::Raw),
            values: ValueFormat::F32,
            chunk: 0,
        };
        let p = compress_topk(&g, Feedback::Residual(&mut r), 2, Method::Exact, &e).unwrap();
        // acc = [3.5, -1, 0.5, -4, -0.5]: sends 0 and 3
        assert_eq!(r, vec![0.0, -1.0, 0.5, 0.0, -0.5]);
        let mut out = vec![0f32; 5];
        decompress_into(&p, &mut out, Write::Overwrite).unwrap();
        assert_eq!(out, vec![3.5, 0.0, 0.0, -4.0, 0.0]);
    }

    #[test]
    fn momentum_correction_matches_its_definition() {
        let n = 5000;
        let (k, m) = (50, 0.9f32);
        let (mut u, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (mut u_ref, mut v_ref) = (vec![0f32; n], vec![0f32; n]);
        let e = encoding(ValueFormat::F32);
        for step in 0..5 {
            let g = grad(n, 100 + step);
            for i in 0..n {
                u_ref[i] = m * u_ref[i] + g[i];
                v_ref[i] += u_ref[i];
            }
            let want = super::super::select::select_topk(&v_ref, k, Method::Exact).unwrap();
            let fb = Feedback::Momentum {
                u: &mut u,
                v: &mut v,
                m,
            };
            let p = compress_topk(&g, fb, k, Method::Exact, &e).unwrap();
            let mut out = vec![0f32; n];
            decompress_into(&p, &mut out, Write::Overwrite).unwrap();
            for &i in &want {
                assert_eq!(out[i as usize], v_ref[i as usize]);
                u_ref[i as usize] = 0.0;
                v_ref[i as usize] = 0.0;
            }
            assert_eq!(u, u_ref);
            assert_eq!(v, v_ref);
        }
    }

    #[test]
    fn nonfinite_gradient_leaves_state_as_it_was() {
        let mut g = grad(200_000, 1);
        g[77_777] = f32::NAN;
        let mut r: Vec<f32> = (0..200_000).map(|i| i as f32 * 1e-3).collect();
        let before = r.clone();
        let err = compress_topk(
            &g,
            Feedback::Residual(&mut r),
            10,
            Method::Exact,
            &encoding(ValueFormat::F32),
        )
        .unwrap_err();
        assert!(
            matches!(err, CompressError::NonFinite { index: 77_777, .. }),
            "{err:?}"
        );
        // Undone as r + g − g: the old residual up to one float32 rounding of r + g.
        let worst = r
            .iter()
            .zip(&before)
            .zip(&g)
            .map(|((a, b), g)| {
                let tol = (b.abs() + g.abs()) * f32::EPSILON;
                if g.is_finite() && (a - b).abs() <= tol || a == b {
                    0.0
                } else {
                    (a - b).abs()
                }
            })
            .fold(0f32, f32::max);
        assert_eq!(worst, 0.0);
        for m in [
            Method::Exact,
            Method::Sampled {
                seed: 1,
                exact_k: true,
            },
        ] {
            let (mut u, mut v) = (before.clone(), before.clone());
            let fb = Feedback::Momentum {
                u: &mut u,
                v: &mut v,
                m: 0.9,
            };
            assert!(compress_topk(&g, fb, 10, m, &encoding(ValueFormat::F32)).is_err());
            assert!(
                u == before && v == before,
                "momentum state must be untouched"
            );
        }
        let err = compress_topk(
            &g,
            Feedback::None,
            10,
            Method::Sampled {
                seed: 0,
                exact_k: true,
            },
            &encoding(ValueFormat::F32),
        )
        .unwrap_err();
        assert!(
            matches!(err, CompressError::NonFinite { index: 77_777, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn overflowing_state_is_reset_and_reported() {
        let g = vec![f32::MAX, 1.0, 1.0];
        let mut r = vec![f32::MAX, 0.5, 0.0];
        let err = compress_topk(
            &g,
            Feedback::Residual(&mut r),
            1,
            Method::Exact,
            &encoding(ValueFormat::F32),
        )
        .unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
        assert_eq!(r, vec![0.0; 3]);
    }

    #[test]
    fn mismatched_state_and_bad_arguments_are_errors() {
        let g = vec![1.0f32; 10];
        let mut r = vec![0f32; 9];
        let e = encoding(ValueFormat::F32);
        assert!(matches!(
            compress_topk(&g, Feedback::Residual(&mut r), 1, Method::Exact, &e),
            Err(CompressError::LengthMismatch {
                got: 9,
                expected: 10,
                ..
            })
        ));
        let (mut u, mut v) = (vec![0f32; 10], vec![0f32; 10]);
        let fb = Feedback::Momentum {
            u: &mut u,
            v: &mut v,
            m: f32::NAN,
        };
        assert!(compress_topk(&g, fb, 1, Method::Exact, &e).is_err());
        let bad = Encoding {
            index: None,
            values: ValueFormat::Int8,
            chunk: 0,
        };
        assert!(compress_topk(&g, Feedback::None, 1, Method::Exact, &bad).is_err());
        let dense = Encoding {
            index: Some(IndexFormat::Dense),
            values: ValueFormat::F32,
            chunk: 0,
        };
        assert!(compress_topk(&g, Feedback::None, 3, Method::Exact, &dense).is_err());
        assert!(compress_topk(&g, Feedback::None, 10, Method::Exact, &dense).is_ok());
    }
}
