//! Property tests: permute / unpermute are inverses, and no input — consistent or not —
//! makes a kernel read or write out of bounds (it either errors or matches a naive model).

use proptest::prelude::*;

use super::*;

/// A routing problem: T tokens of width d, each assigned to k distinct-or-not experts of E.
#[derive(Debug, Clone)]
struct Problem {
    t: usize,
    d: usize,
    e: usize,
    k: usize,
    idx: Vec<i32>,
    x: Vec<f32>,
    w: Vec<f32>,
}

fn problem() -> impl Strategy<Value = Problem> {
    (0usize..12, 0usize..5, 1usize..6)
        .prop_flat_map(|(t, d, e)| (Just(t), Just(d), Just(e), 1..=e))
        .prop_flat_map(|(t, d, e, k)| {
            (
                Just((t, d, e, k)),
                proptest::collection::vec(0..e as i32, t * k),
                proptest::collection::vec(-4i32..4, t * d),
                // weights from a small set so ties (and the tie rule) actually happen
                proptest::collection::vec(0i32..4, t * k),
            )
        })
        .prop_map(|((t, d, e, k), idx, x, w)| Problem {
            t,
            d,
            e,
            k,
            idx,
            x: x.into_iter().map(|v| v as f32).collect(),
            w: w.into_iter().map(|v| v as f32 * 0.25).collect(),
        })
}

/// The naive model of permute: which flat assignments survive capacity, in expert order.
fn naive_order(p: &Problem, capacity: Option<usize>, pad_to: usize) -> (Vec<i32>, Vec<i32>) {
    let mut order = Vec::new();
    let mut counts = Vec::new();
    for ex in 0..p.e as i32 {
        let mut mine: Vec<usize> = (0..p.t * p.k).filter(|&f| p.idx[f] == ex).collect();
        if let Some(cap) = capacity {
            // drop lowest weight first, later assignment first among equals
            while mine.len() > cap {
                let victim = (0..mine.len())
                    .min_by(|&a, &b| {
                        p.w[mine[a]]
                            .partial_cmp(&p.w[mine[b]])
                            .unwrap()
                            .then(mine[b].cmp(&mine[a]))
                    })
                    .unwrap();
                mine.remove(victim);
            }
        }
        let padded = mine.len().div_ceil(pad_to) * pad_to;
        order.extend(mine.iter().map(|&f| f as i32));
        order.extend(std::iter::repeat_n(-1, padded - mine.len()));
        counts.push(padded as i32);
    }
    (order, counts)
}

/// The naive model of unpermute: y[t] = Σ w · y_sorted[r] over rows naming t's assignments.
fn naive_unpermute(
    ys: &[f32],
    d: usize,
    order: &[i32],
    w: Option<&[f32]>,
    t: usize,
    k: usize,
) -> Vec<f32> {
    let mut y = vec![0.0f32; t * d];
    for (r, &o) in order.iter().enumerate() {
        if o >= 0 {
            let o = o as usize;
            let wt = w.map_or(1.0, |w| w[o]);
            for c in 0..d {
                y[(o / k) * d + c] += wt * ys[r * d + c];
            }
        }
    }
    y
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn permute_matches_naive_and_unpermute_inverts_it(
        p in problem(),
        cap in proptest::option::of(0usize..6),
        pad_to in 1usize..4,
    ) {
        let x = Matrix::new("x", &p.x, p.t, p.d).unwrap();
        let idx = Matrix::new("expert_idx", &p.idx, p.t, p.k).unwrap();
        let w = Matrix::new("weights", &p.w, p.t, p.k).unwrap();
        let opts = PermuteOptions { n_experts: p.e, capacity: cap, weights: Some(w), pad_to };
        let out = permute(x, idx, &opts).unwrap();
        let (order, counts) = naive_order(&p, cap, pad_to);
        prop_assert_eq!(&out.order, &order);
        prop_assert_eq!(&out.counts, &counts);
        prop_assert_eq!(out.x_sorted.len(), order.len() * p.d);
        for (r, &o) in order.iter().enumerate() {
            let want: Vec<f32> = if o < 0 { vec![0.0; p.d] } else { x.row(o as usize / p.k).to_vec() };
            prop_assert_eq!(&out.x_sorted[r * p.d..(r + 1) * p.d], &want[..]);
        }
        // unpermute with weights is the naive weighted sum; with one-hot weights on the kept
        // assignments it gives back x exactly (the inverse).
        let ys = Matrix::new("y_sorted", &out.x_sorted, out.rows(), p.d).unwrap();
        let y = unpermute(ys, &out.order, Some(w), p.t, p.k).unwrap();
        prop_assert_eq!(y, naive_unpermute(&out.x_sorted, p.d, &out.order, Some(&p.w), p.t, p.k));
        let mut first = vec![0.0f32; p.t * p.k];
        let mut kept_token = vec![false; p.t];
        for &o in out.order.iter().filter(|&&o| o >= 0) {
            let tok = o as usize / p.k;
            if !kept_token[tok] {
                kept_token[tok] = true;
                first[o as usize] = 1.0;
            }
        }
        let one_hot = Matrix::new("weights", &first, p.t, p.k).unwrap();
        let back = unpermute(ys, &out.order, Some(one_hot), p.t, p.k).unwrap();
        for tok in 0..p.t {
            let want: Vec<f32> = if kept_token[tok] { x.row(tok).to_vec() } else { vec![0.0; p.d] };
            prop_assert_eq!(&back[tok * p.d..(tok + 1) * p.d], &want[..]);
        }
        // permute_backward of dropless permute sums each token's k copies.
        if cap.is_none() {
            let dx = permute_backward(ys, &out.order, p.t, p.k).unwrap();
            prop_assert_eq!(dx, naive_unpermute(&out.x_sorted, p.d, &out.order, None, p.t, p.k));
        }
    }

    #[test]
    fn unpermute_on_arbitrary_order_errors_or_matches_naive(
        t in 0usize..6, k in 1usize..4, d in 0usize..4,
        raw in proptest::collection::vec(-3i32..20, 0..20),
    ) {
        let ys: Vec<f32> = (0..raw.len() * d).map(|i| i as f32).collect();
        let ym = Matrix::new("y_sorted", &ys, raw.len(), d).unwrap();
        let w: Vec<f32> = (0..t * k).map(|i| i as f32 + 0.5).collect();
        let wm = Matrix::new("weights", &w, t, k).unwrap();
        let tk = (t * k) as i32;
        let mut seen = std::collections::HashSet::new();
        let valid = raw.iter().all(|&o| o == -1 || (0..tk).contains(&o) && seen.insert(o));
        match unpermute(ym, &raw, Some(wm), t, k) {
            Ok(y) => {
                prop_assert!(valid);
                prop_assert_eq!(y, naive_unpermute(&ys, d, &raw, Some(&w), t, k));
            }
            Err(e) => {
                prop_assert!(!valid);
                prop_assert!(matches!(e, MoeError::Entry { arg: "order", .. }), "{}", e);
            }
        }
        let dy: Vec<f32> = (0..t * d).map(|i| 1.0 - i as f32).collect();
        let dym = Matrix::new("dy", &dy, t, d).unwrap();
        prop_assert_eq!(unpermute_backward(dym, ym, &raw, wm).is_ok(), valid);
    }

    #[test]
    fn grouped_matmul_on_arbitrary_counts_errors_or_matches_naive(
        counts in proptest::collection::vec(-2i32..5, 1..5),
        rows in 0usize..12, d_in in 0usize..4, d_out in 0usize..4,
    ) {
        let e = counts.len();
        let x: Vec<f32> = (0..rows * d_in).map(|i| (i % 5) as f32 - 2.0).collect();
        let w: Vec<f32> = (0..e * d_in * d_out).map(|i| (i % 3) as f32 - 1.0).collect();
        let xm = Matrix::new("x_sorted", &x, rows, d_in).unwrap();
        let ws = MatrixStack::new("w", &w, e, d_in, d_out).unwrap();
        let valid = counts.iter().all(|&c| c >= 0) && counts.iter().sum::<i32>() as usize == rows;
        let y = grouped_matmul(xm, &counts, ws);
        prop_assert_eq!(y.is_ok(), valid);
        if let Ok(y) = y {
            let mut row = 0;
            for (ex, &c) in counts.iter().enumerate() {
                for q in row..row + c as usize {
                    for j in 0..d_out {
                        let want: f32 = (0..d_in).map(|i| x[q * d_in + i] * w[(ex * d_in + i) * d_out + j]).sum();
                        prop_assert_eq!(y[q * d_out + j], want);
                    }
                }
                row += c as usize;
            }
            let dy: Vec<f32> = (0..rows * d_out).map(|i| (i % 4) as f32).collect();
            let dym = Matrix::new("dy", &dy, rows, d_out).unwrap();
            prop_assert_eq!(grouped_matmul_dx(dym, &counts, ws).unwrap().len(), rows * d_in);
            prop_assert_eq!(grouped_matmul_dw(xm, dym, &counts).unwrap().len(), e * d_in * d_out);
        }
    }

    #[test]
    fn route_chooses_distinct_top_k_with_normalised_weights(
        t in 0usize..8, e in 1usize..9, k_off in 0usize..8, sigmoid in any::<bool>(),
        logits in proptest::collection::vec(-3i32..3, 64),
        with_bias in any::<bool>(),
    ) {
        let k = 1 + k_off % e;
        let l: Vec<f32> = logits.iter().cycle().take(t * e).map(|&v| v as f32 * 0.5).collect();
        let bias: Vec<f32> = (0..e).map(|i| (i % 3) as f32 * 0.1).collect();
        let opts = RouteOptions {
            k,
            score: if sigmoid { Score::Sigmoid } else { Score::Softmax },
            n_groups: None,
            topk_groups: None,
            normalize: true,
        };
        let b = with_bias.then_some(&bias[..]);
        let r = route(Matrix::new("logits", &l, t, e).unwrap(), b, &opts).unwrap();
        for row in 0..t {
            let idx = &r.expert_idx[row * k..(row + 1) * k];
            let choice: Vec<f32> = (0..e).map(|x| r.probs[row * e + x] + b.map_or(0.0, |b| b[x])).collect();
            // descending choice score, ties to the lower index, and nothing better left out
            for j in 1..k {
                let (a, c) = (idx[j - 1] as usize, idx[j] as usize);
                prop_assert!(choice[a] > choice[c] || (choice[a] == choice[c] && a < c));
            }
            let last = idx[k - 1] as usize;
            for x in (0..e).filter(|x| !idx.contains(&(*x as i32))) {
                prop_assert!(choice[x] < choice[last] || (choice[x] == choice[last] && x > last));
            }
            let s: f32 = r.weights[row * k..(row + 1) * k].iter().sum();
            prop_assert!((s - 1.0).abs() < 1e-5);
        }
    }
}
