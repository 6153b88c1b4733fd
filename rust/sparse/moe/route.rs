//! Top-k routing: softmax/sigmoid scores, biased (aux-loss-free) and group-limited choice,
//! renormalised weights; and the gradient of the weights with respect to the logits.

use std::str::FromStr;

use super::error::MoeError;
use super::matrix::Matrix;
use super::par::{rows_per_block, run, COMPUTE_BOUND};
use crate::linalg::fastmath::exp_nonpositive_slice;

/// How logits become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Score {
    /// `softmax` over the experts of a token (Switch, GShard, Mixtral).
    Softmax,
    /// An independent `sigmoid` per expert (DeepSeek-V3).
    Sigmoid,
}

impl FromStr for Score {
    type Err = MoeError;

    fn from_str(s: &str) -> Result<Self, MoeError> {
        match s {
            "softmax" => Ok(Self::Softmax),
            "sigmoid" => Ok(Self::Sigmoid),
            other => Err(MoeError::value(
                "score",
                "\"softmax\" or \"sigmoid\"",
                format!("{other:?}"),
            )),
        }
    }
}

/// The knobs of [`route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteOptions {
    /// Experts per token, in `1..=E`.
    pub k: usize,
    pub score: Score,
    /// Group-limited routing: experts split into `n_groups` contiguous groups …
    pub n_groups: Option<usize>,
    /// … of which the best `topk_groups` (by the sum of their top-2 choice scores) are kept.
    pub topk_groups: Option<usize>,
    /// Renormalise the chosen probabilities to sum to 1 over the k (raw probabilities if not).
    pub normalize: bool,
}

/// What [`route`] returns, all row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// `[T, k]`: chosen experts, by descending choice score (ties to the lower index).
    pub expert_idx: Vec<i32>,
    /// `[T, k]`: the unbiased probabilities of the chosen experts (renormalised if asked).
    pub weights: Vec<f32>,
    /// `[T, E]`: softmax or sigmoid of the logits.
    pub probs: Vec<f32>,
}

/// Routes each of the `T` tokens (rows of `logits`, `[T, E]`) to `k` experts.
///
/// probs = softmax or sigmoid of the logits (numerically stable, f32). The choice is the
/// top-k of `probs + bias` (`bias` `[E]` steers the choice only); with `n_groups`, the
/// experts form `n_groups` contiguous groups, a group scores the sum of its two best choice
/// scores (its best one for groups of one expert), and only the best `topk_groups` groups
/// compete. weights = probs of the chosen experts, divided by their sum when `normalize`
/// (0 if that sum underflowed to 0).
pub fn route(
    logits: Matrix<'_, f32>,
    bias: Option<&[f32]>,
    opts: &RouteOptions,
) -> Result<Routing, MoeError> {
    let e = logits.cols();
    let k = opts.k;
    if e == 0 || i32::try_from(e).is_err() {
        return Err(MoeError::shape(
            "logits",
            "[T, E] with 1 <= E < 2^31",
            logits.shape(),
        ));
    }
    if k == 0 || k > e {
        return Err(MoeError::value(
            "k",
            format!("an integer in [1, {e}] (E)"),
            k,
        ));
    }
    let groups = check_groups(opts, e)?;
    if let Some(b) = bias {
        if b.len() != e {
            return Err(MoeError::shape(
                "bias",
                format!("[{e}]"),
                format!("[{}]", b.len()),
            ));
        }
        if let Some(i) = b.iter().position(|v| !v.is_finite()) {
            return Err(MoeError::entry("bias", &[i], "a finite value", b[i]));
        }
    }
    // A branch-free pass (it vectorises) first; the position only when something is wrong.
    let all_finite = logits.data().iter().fold(true, |ok, v| ok & v.is_finite());
    if let Some(i) = (!all_finite)
        .then(|| logits.data().iter().position(|v| !v.is_finite()))
        .flatten()
    {
        return Err(MoeError::entry(
            "logits",
            &[i / e, i % e],
            "a finite value",
            logits.data()[i],
        ));
    }

    let t = logits.rows();
    let mut out = Routing {
        expert_idx: vec![0; t * k],
        weights: vec![0.0; t * k],
        probs: vec![0.0; t * e],
    };
    let rows = rows_per_block(t, e * 4 * 4, COMPUTE_BOUND);
    let blocks: Vec<_> = out
        .probs
        .chunks_mut(rows * e)
        .zip(out.expert_idx.chunks_mut(rows * k))
        .zip(out.weights.chunks_mut(rows * k))
        .collect();
    run(blocks, |block, ((probs, idx), weights)| {
        let first = block * rows;
        let x = &logits.data()[first * e..first * e + probs.len()];
        scores(x, e, opts.score, probs);
        let mut scratch = RowScratch::new(e);
        for ((p, i), w) in probs
            .chunks(e)
            .zip(idx.chunks_mut(k))
            .zip(weights.chunks_mut(k))
        {
            route_row(p, bias, groups, opts, &mut scratch, i, w);
        }
    });
    Ok(out)
}

/// `(n_groups, topk_groups)` when group-limited routing is asked for and consistent.
fn check_groups(opts: &RouteOptions, e: usize) -> Result<Option<(usize, usize)>, MoeError> {
    match (opts.n_groups, opts.topk_groups) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(MoeError::value(
            "topk_groups",
            "an integer when n_groups is given",
            "None",
        )),
        (None, Some(_)) => Err(MoeError::value(
            "n_groups",
            "an integer when topk_groups is given",
            "None",
        )),
        (Some(g), Some(tg)) => {
            if g == 0 || !e.is_multiple_of(g) {
                return Err(MoeError::value(
                    "n_groups",
                    format!("a divisor of E = {e}"),
                    g,
                ));
            }
            if tg == 0 || tg > g {
                return Err(MoeError::value(
                    "topk_groups",
                    format!("an integer in [1, {g}] (n_groups)"),
                    tg,
                ));
            }
            let reachable = tg * (e / g);
            if opts.k > reachable {
                return Err(MoeError::value(
                    "k",
                    format!("at most topk_groups * E / n_groups = {tg} * {e} / {g} = {reachable}"),
                    opts.k,
                ));
            }
            Ok(Some((g, tg)))
        }
    }
}

/// Softmax (max-subtracted) or sigmoid (of `-|x|`, so exp never overflows) of the rows of
/// `x` (`e` wide), into `probs`; the exponentials run over the whole block at once so they
/// vectorise.
fn scores(x: &[f32], e: usize, score: Score, probs: &mut [f32]) {
    match score {
        Score::Softmax => {
            for (p, row) in probs.chunks_mut(e).zip(x.chunks(e)) {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (pp, &v) in p.iter_mut().zip(row) {
                    *pp = v - m;
                }
            }
            exp_nonpositive_slice(probs);
            for p in probs.chunks_mut(e) {
                // sum >= 1: the maximum contributes e^0.
                let sum: f32 = p.iter().sum();
                for pp in p.iter_mut() {
                    *pp /= sum;
                }
            }
        }
        Score::Sigmoid => {
            for (p, &v) in probs.iter_mut().zip(x) {
                *p = -v.abs();
            }
            exp_nonpositive_slice(probs);
            for (p, &v) in probs.iter_mut().zip(x) {
                // z = e^-|v|: sigmoid(v) = 1 / (1 + z) for v >= 0, z / (1 + z) below.
                let z = *p;
                *p = if v >= 0.0 { 1.0 } else { z } / (1.0 + z);
            }
        }
    }
}

/// Buffers of [`route_row`], allocated once per block of rows.
struct RowScratch {
    choice: Vec<f32>,
    allowed: Vec<bool>,
    group_scores: Vec<f32>,
    best: Vec<(f32, usize)>,
}

impl RowScratch {
    fn new(e: usize) -> Self {
        Self {
            choice: vec![0.0; e],
            allowed: vec![true; e],
            group_scores: Vec::new(),
            best: Vec::with_capacity(e),
        }
    }
}

fn route_row(
    probs: &[f32],
    bias: Option<&[f32]>,
    groups: Option<(usize, usize)>,
    opts: &RouteOptions,
    s: &mut RowScratch,
    idx: &mut [i32],
    weights: &mut [f32],
) {
    match bias {
        Some(b) => {
            for ((c, &p), &bb) in s.choice.iter_mut().zip(probs).zip(b) {
                *c = p + bb;
            }
        }
        None => s.choice.copy_from_slice(probs),
    }
    let allowed: Option<&[bool]> = match groups {
        None => None,
        Some((g, tg)) => {
            let size = probs.len() / g;
            s.group_scores.clear();
            for grp in s.choice.chunks(size) {
                top_k(grp, size.min(2), None, &mut s.best);
                s.group_scores.push(s.best.iter().map(|&(v, _)| v).sum());
            }
            top_k(&s.group_scores, tg, None, &mut s.best);
            s.allowed.fill(false);
            for &(_, grp) in &s.best {
                s.allowed[grp * size..(grp + 1) * size].fill(true);
            }
            Some(&s.allowed)
        }
    };
    top_k(&s.choice, opts.k, allowed, &mut s.best);
    for ((i, w), &(_, expert)) in idx.iter_mut().zip(weights.iter_mut()).zip(&s.best) {
        // expert < E < 2^31, checked by `route`.
        *i = expert as i32;
        *w = probs[expert];
    }
    if opts.normalize {
        let sum: f32 = weights.iter().sum();
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for w in weights.iter_mut() {
            *w *= inv;
        }
    }
}

/// Leaves in `best` the (at most) `k` entries of `scores` (among the `allowed` ones) with the
/// highest score, in descending order of score, ties to the lower index. O(len · k), which
/// beats sorting for the small k of routing.
fn top_k(scores: &[f32], k: usize, allowed: Option<&[bool]>, best: &mut Vec<(f32, usize)>) {
    best.clear();
    for (i, &v) in scores.iter().enumerate() {
        if allowed.is_some_and(|a| !a[i]) {
            continue;
        }
        if best.len() == k {
            match best.last() {
                // Equal scores keep the earlier (lower) index, so strictly greater is needed.
                Some(&(worst, _)) if v > worst => {
                    best.pop();
                }
                _ => continue,
            }
        }
        let pos = best.iter().position(|&(b, _)| v > b).unwrap_or(best.len());
        best.insert(pos, (v, i));
    }
}

/// The gradient of the routing weights with respect to the logits: `d_logits` `[T, E]` from
/// `d_weights` `[T, k]`, through the renormalisation (when `normalize`) and the softmax or
/// sigmoid. The choice (`expert_idx`) is taken as fixed: it has no gradient.
pub fn route_backward(
    d_weights: Matrix<'_, f32>,
    expert_idx: Matrix<'_, i32>,
    probs: Matrix<'_, f32>,
    score: Score,
    normalize: bool,
) -> Result<Vec<f32>, MoeError> {
    let (t, e, k) = (probs.rows(), probs.cols(), expert_idx.cols());
    if e == 0 {
        return Err(MoeError::shape(
            "probs",
            "[T, E] with E >= 1",
            probs.shape(),
        ));
    }
    if k == 0 || k > e {
        return Err(MoeError::shape(
            "expert_idx",
            format!("[T, k] with 1 <= k <= E = {e}"),
            expert_idx.shape(),
        ));
    }
    expert_idx.expect_shape("expert_idx", t, k)?;
    d_weights.expect_shape("d_weights", t, k)?;
    check_expert_idx(expert_idx, e)?;

    let mut d_logits = vec![0.0f32; t * e];
    let rows = rows_per_block(t, e * 4 * 3, COMPUTE_BOUND);
    run(d_logits.chunks_mut(rows * e).collect(), |block, out| {
        for (i, dl) in out.chunks_mut(e).enumerate() {
            let row = block * rows + i;
            route_backward_row(
                d_weights.row(row),
                expert_idx.row(row),
                probs.row(row),
                score,
                normalize,
                dl,
            );
        }
    });
    Ok(d_logits)
}

/// [`route_backward`] for one token: `g` `[k]`, `idx` `[k]`, `p` `[E]` into `dl` `[E]`
/// (zeros on entry).
fn route_backward_row(
    g: &[f32],
    idx: &[i32],
    p: &[f32],
    score: Score,
    normalize: bool,
    dl: &mut [f32],
) {
    // dl holds dL/dprobs first, then is turned into dL/dlogits in place.
    if normalize {
        let sum: f64 = idx.iter().map(|&i| f64::from(p[i as usize])).sum();
        if sum > 0.0 {
            // w_j = p_j / S  =>  dL/dp_j = (g_j - sum_i g_i w_i) / S
            let gw: f64 = g
                .iter()
                .zip(idx)
                .map(|(&gj, &i)| f64::from(gj) * f64::from(p[i as usize]) / sum)
                .sum();
            for (&gj, &i) in g.iter().zip(idx) {
                dl[i as usize] += ((f64::from(gj) - gw) / sum) as f32;
            }
        }
    } else {
        for (&gj, &i) in g.iter().zip(idx) {
            dl[i as usize] += gj;
        }
    }
    match score {
        Score::Softmax => {
            let dot: f64 = dl
                .iter()
                .zip(p)
                .map(|(&d, &pp)| f64::from(d) * f64::from(pp))
                .sum();
            for (d, &pp) in dl.iter_mut().zip(p) {
                *d = (f64::from(pp) * (f64::from(*d) - dot)) as f32;
            }
        }
        Score::Sigmoid => {
            for (d, &pp) in dl.iter_mut().zip(p) {
                *d *= pp * (1.0 - pp);
            }
        }
    }
}

/// Errors unless every entry of `expert_idx` is in `[0, e)`.
pub(crate) fn check_expert_idx(expert_idx: Matrix<'_, i32>, e: usize) -> Result<(), MoeError> {
    let k = expert_idx.cols().max(1);
    // Branch-free pass first (it vectorises); the position only when something is wrong.
    let in_range = |i: i32| (i as u32 as usize) < e;
    let all_ok = expert_idx
        .data()
        .iter()
        .fold(true, |ok, &i| ok & in_range(i));
    match (!all_ok)
        .then(|| expert_idx.data().iter().position(|&i| !in_range(i)))
        .flatten()
    {
        None => Ok(()),
        Some(pos) => Err(MoeError::entry(
            "expert_idx",
            &[pos / k, pos % k],
            format!("an expert index in [0, {e})"),
            expert_idx.data()[pos],
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(k: usize, score: Score) -> RouteOptions {
        RouteOptions {
            k,
            score,
            n_groups: None,
            topk_groups: None,
            normalize: true,
        }
    }

    #[test]
    fn softmax_top2_by_hand() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let m = Matrix::new("logits", &logits, 1, 4).unwrap();
        let r = route(m, None, &opts(2, Score::Softmax)).unwrap();
        let ex: Vec<f64> = logits.iter().map(|&v| f64::from(v).exp()).collect();
        let z: f64 = ex.iter().sum();
        for (p, x) in r.probs.iter().zip(&ex) {
            assert!((f64::from(*p) - x / z).abs() < 1e-6);
        }
        assert_eq!(r.expert_idx, vec![1, 2]);
        let w1 = ex[1] / (ex[1] + ex[2]);
        assert!((f64::from(r.weights[0]) - w1).abs() < 1e-6);
        assert!((f64::from(r.weights[1]) - (1.0 - w1)).abs() < 1e-6);
    }

    #[test]
    fn ties_go_to_the_lower_index_and_bias_only_steers() {
        let logits = [0.0f32; 4];
        let m = Matrix::new("logits", &logits, 1, 4).unwrap();
        let r = route(m, None, &opts(3, Score::Softmax)).unwrap();
        assert_eq!(r.expert_idx, vec![0, 1, 2]);
        let bias = [0.0f32, 0.0, 0.0, 1.0];
        let mut o = opts(2, Score::Sigmoid);
        o.normalize = false;
        let r = route(m, Some(&bias), &o).unwrap();
        assert_eq!(r.expert_idx, vec![3, 0]);
        assert_eq!(r.weights, vec![0.5, 0.5], "weights ignore the bias");
    }

    #[test]
    fn group_limited_keeps_best_groups() {
        // groups {0,1} {2,3} {4,5}: group scores (top-2 sums) 0.9+0.0, 0.5+0.5, 0.8+0.3.
        let logits = [0.9f32, 0.0, 0.5, 0.5, 0.8, 0.3];
        let m = Matrix::new("logits", &logits, 1, 6).unwrap();
        let mut o = opts(2, Score::Softmax);
        o.n_groups = Some(3);
        o.topk_groups = Some(1);
        // softmax is monotone, so the group order follows the logits' sums only approximately;
        // use sigmoid-free reasoning on the probs actually computed:
        let r = route(m, None, &o).unwrap();
        let p = &r.probs;
        let sums = [p[0] + p[1], p[2] + p[3], p[4] + p[5]];
        let best = (0..3).fold(0, |b, g| if sums[g] > sums[b] { g } else { b });
        let mut got = r.expert_idx.clone();
        got.sort_unstable();
        assert_eq!(got, vec![2 * best as i32, 2 * best as i32 + 1]);
    }

    #[test]
    fn rejects_bad_arguments() {
        let logits = [0.0f32; 8];
        let m = Matrix::new("logits", &logits, 2, 4).unwrap();
        let e = route(m, None, &opts(5, Score::Softmax)).unwrap_err();
        assert_eq!(e.to_string(), "k: expected an integer in [1, 4] (E), got 5");
        let bad = [0.0f32, f32::NAN, 0.0, 0.0];
        let m = Matrix::new("logits", &bad, 1, 4).unwrap();
        let e = route(m, None, &opts(1, Score::Softmax)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("logits[0, 1]: expected a finite value"),
            "{e}"
        );
        let mut o = opts(1, Score::Softmax);
        o.n_groups = Some(3);
        o.topk_groups = Some(1);
        let m = Matrix::new("logits", &logits, 2, 4).unwrap();
        assert!(matches!(
            route(m, None, &o),
            Err(MoeError::Value {
                arg: "n_groups",
                ..
            })
        ));
        assert!("relu".parse::<Score>().is_err());
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (t, e, k) = (3usize, 5usize, 2usize);
        let logits: Vec<f32> = (0..t * e)
            .map(|i| ((i * 37 % 11) as f32) * 0.3 - 1.5)
            .collect();
        let g: Vec<f32> = (0..t * k).map(|i| (i as f32) * 0.25 - 0.6).collect();
        for score in [Score::Softmax, Score::Sigmoid] {
            for normalize in [true, false] {
                let mut o = opts(k, score);
                o.normalize = normalize;
                let m = Matrix::new("logits", &logits, t, e).unwrap();
                let r = route(m, None, &o).unwrap();
                let d = route_backward(
                    Matrix::new("d_weights", &g, t, k).unwrap(),
                    Matrix::new("expert_idx", &r.expert_idx, t, k).unwrap(),
                    Matrix::new("probs", &r.probs, t, e).unwrap(),
                    score,
                    normalize,
                )
                .unwrap();
                // f64 reference of the weights with the choice held fixed.
                let loss = |x: &[f64]| -> f64 {
                    let mut total = 0.0;
                    for row in 0..t {
                        let xr = &x[row * e..(row + 1) * e];
                        let p: Vec<f64> = match score {
                            Score::Softmax => {
                                let m = xr.iter().copied().fold(f64::MIN, f64::max);
                                let z: f64 = xr.iter().map(|v| (v - m).exp()).sum();
                                xr.iter().map(|v| (v - m).exp() / z).collect()
                            }
                            Score::Sigmoid => xr.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
                        };
                        let idx = &r.expert_idx[row * k..(row + 1) * k];
                        let s: f64 = idx.iter().map(|&i| p[i as usize]).sum();
                        for j in 0..k {
                            let w = p[idx[j] as usize] / if normalize { s } else { 1.0 };
                            total += f64::from(g[row * k + j]) * w;
                        }
                    }
                    total
                };
                let x0: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
                for i in 0..t * e {
                    let (mut xp, mut xm) = (x0.clone(), x0.clone());
                    xp[i] += 1e-6;
                    xm[i] -= 1e-6;
                    let fd = (loss(&xp) - loss(&xm)) / 2e-6;
                    assert!(
                        (fd - f64::from(d[i])).abs() < 1e-5,
                        "{score:?} {normalize} {i}: {fd} vs {}",
                        d[i]
                    );
                }
            }
        }
    }

    #[test]
    fn backward_rejects_out_of_range_experts() {
        let (g, p) = ([1.0f32], [0.5f32, 0.5]);
        let idx = [2i32];
        let err = route_backward(
            Matrix::new("d_weights", &g, 1, 1).unwrap(),
            Matrix::new("expert_idx", &idx, 1, 1).unwrap(),
            Matrix::new("probs", &p, 1, 2).unwrap(),
            Score::Softmax,
            true,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert_idx[0, 0]: expected an expert index in [0, 2), got 2"
        );
    }
}
