//! Every schedule completes (simulated), sends and receives match, and the bubble and the
//! activations alive are those of the theory (Megatron-LM §2.2; DeepSeek-V3 Table 2).

use proptest::prelude::*;

use super::sim::check;
use super::*;

const F: f64 = 1.0;
const B: f64 = 2.0;

fn run(kind: Kind, p: usize, m: usize, v: usize) -> (Schedule, PipeSimResult) {
    let s = build(kind, p, m, v).unwrap();
    // A chunk of an interleaved rank is 1/v of the rank's layers.
    let scale = 1.0 / s.chunks.max(1) as f64;
    let scale = if kind == Kind::Interleaved {
        scale
    } else {
        1.0
    };
    let r = simulate(&s, &PipeCost::uniform(s.stages, F * scale, B * scale)).unwrap();
    (s, r)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1() {
    for kind in [Kind::Gpipe, Kind::OneFOneB] {
        for p in 1..=8 {
            for m in 1..=24 {
                let (_, r) = run(kind, p, m, 1);
                let theory = (p - 1) as f64 / (m + p - 1) as f64;
                assert!(
                    close(r.bubble, theory),
                    "{kind:?} p={p} m={m}: {} vs {theory}",
                    r.bubble
                );
                assert!(close(r.step_s, (m + p - 1) as f64 * (F + B)));
            }
        }
    }
}

#[test]
fn interleaved_bubble_is_p_minus_1_over_vm_plus_p_minus_1() {
    for p in 2..=6 {
        for v in 2..=4 {
            for m in (p..=4 * p).step_by(p) {
                let (_, r) = run(Kind::Interleaved, p, m, v);
                let theory = (p - 1) as f64 / (v * m + p - 1) as f64;
                assert!(
                    close(r.bubble, theory),
                    "p={p} v={v} m={m}: {} vs {theory}",
                    r.bubble
                );
            }
        }
    }
}

/// DeepSeek-V3 Table 2: DualPipe's bubble is (p/2 − 1)(F&B + B − 3W), against 1F1B's
/// (p − 1)(F + B), and does not grow with m. Here the backward is not split (W = 0) and a
/// forward and a backward run one after the other (F&B = F + B, no overlap), so each rank
/// idles at most (p/2 − 1)(F + 2B), the same for every m. (The simulated idle time is
/// lower: the report's F&B pairs are counted whole where this order can start the forward
/// half of a pair early.)
#[test]
fn dualpipe_bubble_is_within_the_reports_and_constant_in_m() {
    for p in (2..=8).step_by(2) {
        let mut idle_at_2p = None;
        for m in (2 * p..=6 * p).step_by(2) {
            let (_, r) = run(Kind::DualPipe, p, m, 1);
            let bound = (p / 2 - 1) as f64 * (F + 2.0 * B);
            for (rank, busy) in r.busy_s.iter().enumerate() {
                let idle = r.step_s - busy;
                assert!(
                    idle <= bound + 1e-9,
                    "p={p} m={m} rank {rank}: idle {idle} > {bound}"
                );
                assert!(
                    close(idle, *idle_at_2p.get_or_insert(idle)),
                    "p={p} m={m}: grows with m"
                );
                let one_f_one_b = (p - 1) as f64 * (F + B);
                assert!(p == 2 || idle < one_f_one_b, "p={p}: no better than 1F1B");
            }
        }
    }
}

#[test]
fn one_f_one_b_keeps_at_most_p_micro_batches_alive() {
    for p in 1..=8 {
        for m in 1..=24 {
            let (_, r) = run(Kind::OneFOneB, p, m, 1);
            for (rank, &alive) in r.peak_alive.iter().enumerate() {
                assert_eq!(alive, (p - rank).min(m), "p={p} m={m} rank {rank}");
            }
            let (_, g) = run(Kind::Gpipe, p, m, 1);
            assert!(g.peak_alive.iter().all(|&a| a == m), "GPipe stashes all m");
        }
    }
}

/// DeepSeek-V3 Table 2: DualPipe holds PP + 1 micro-batches' activations per device at most.
#[test]
fn dualpipe_keeps_at_most_p_plus_1_alive() {
    for p in (2..=8).step_by(2) {
        for m in (2 * p..=6 * p).step_by(2) {
            let (_, r) = run(Kind::DualPipe, p, m, 1);
            let worst = *r.peak_alive.iter().max().unwrap();
            assert!(worst <= p + 1, "p={p} m={m}: {:?}", r.peak_alive);
        }
    }
}

#[test]
fn messages_are_two_per_stage_boundary_and_micro_batch() {
    let (s, r) = run(Kind::Interleaved, 4, 8, 2);
    assert_eq!(r.messages, 2 * 8 * (s.stages - 1));
    let (s, r) = run(Kind::DualPipe, 4, 8, 1);
    assert_eq!(r.messages, 2 * 8 * (s.stages - 1));
    assert_eq!(
        s.placement,
        vec![vec![0, 3], vec![1, 2], vec![2, 1], vec![3, 0]]
    );
}

#[test]
fn a_receive_moved_before_its_send_deadlocks() {
    let mut s = build(Kind::OneFOneB, 2, 2, 1).unwrap();
    // Rank 0 waits for micro-batch 0's gradient before sending its activation.
    let recv = s.steps[0]
        .iter()
        .position(|st| {
            matches!(
                st,
                Step::Recv {
                    pass: Pass::Backward,
                    mb: 0,
                    ..
                }
            )
        })
        .unwrap();
    let moved = s.steps[0].remove(recv);
    s.steps[0].insert(0, moved);
    let err = simulate(&s, &PipeCost::uniform(2, 1.0, 1.0)).unwrap_err();
    assert!(matches!(err, PipelineError::Deadlock(_)), "{err}");
    assert!(err.to_string().contains("rank 0 waits"), "{err}");
}

#[test]
fn a_missing_receive_or_compute_is_refused() {
    let mut s = build(Kind::Gpipe, 3, 4, 1).unwrap();
    let recv = s.steps[2]
        .iter()
        .position(|st| matches!(st, Step::Recv { .. }))
        .unwrap();
    s.steps[2].remove(recv);
    assert!(matches!(check(&s), Err(PipelineError::BadSchedule(_))));
    let mut s = build(Kind::OneFOneB, 2, 3, 1).unwrap();
    s.steps[1].retain(|st| {
        !matches!(
            st,
            Step::Compute {
                pass: Pass::Backward,
                mb: 2,
                ..
            }
        )
    });
    let err = check(&s).unwrap_err().to_string();
    assert!(err.contains("has not computed"), "{err}");
}

#[test]
fn bad_configurations_are_refused() {
    for (kind, p, m, v) in [
        (Kind::OneFOneB, 0, 4, 1),
        (Kind::Gpipe, 2, 0, 1),
        (Kind::Interleaved, 2, 4, 1),
        (Kind::Interleaved, 4, 6, 2),
        (Kind::DualPipe, 3, 6, 1),
        (Kind::DualPipe, 4, 6, 1),
        (Kind::DualPipe, 2, 5, 1),
    ] {
        assert!(matches!(
            build(kind, p, m, v),
            Err(PipelineError::BadConfig(_))
        ));
    }
    assert!(Kind::parse("zb").is_err());
    for k in [
        Kind::Gpipe,
        Kind::OneFOneB,
        Kind::Interleaved,
        Kind::DualPipe,
    ] {
        assert_eq!(Kind::parse(k.name()), Ok(k));
    }
}

fn config() -> impl Strategy<Value = (Kind, usize, usize, usize)> {
    prop_oneof![
        (1usize..9, 1usize..33).prop_map(|(p, m)| (Kind::Gpipe, p, m, 1)),
        (1usize..9, 1usize..33).prop_map(|(p, m)| (Kind::OneFOneB, p, m, 1)),
        (2usize..7, 1usize..6, 2usize..5).prop_map(|(p, g, v)| (Kind::Interleaved, p, g * p, v)),
        (1usize..5, 0usize..8).prop_map(|(h, extra)| (Kind::DualPipe, 2 * h, 4 * h + 2 * extra, 1)),
    ]
}

proptest! {
    /// Whatever the stage times and message costs, every schedule completes, uses each
    /// rank's compute fully, and is no faster than its busiest rank.
    #[test]
    fn every_schedule_completes(
        (kind, p, m, v) in config(),
        times in prop::collection::vec((0.01f64..3.0, 0.01f64..3.0), 32),
        latency in 0.0f64..0.5,
    ) {
        let s = build(kind, p, m, v).unwrap();
        let cost = PipeCost {
            forward_s: (0..s.stages).map(|i| times[i % 32].0).collect(),
            backward_s: (0..s.stages).map(|i| times[i % 32].1).collect(),
            latency_s: latency,
            transfer_s: latency / 2.0,
        };
        let r = simulate(&s, &cost).unwrap();
        for rank in 0..p {
            let own: f64 = s.placement[rank]
                .iter()
                .map(|&st| (cost.forward_s[st] + cost.backward_s[st]) * (m as f64))
                .sum();
            let own = if kind == Kind::DualPipe { own / 2.0 } else { own };
            prop_assert!((r.busy_s[rank] - own).abs() < 1e-6 * own.max(1.0));
            prop_assert!(r.step_s + 1e-9 >= r.busy_s[rank]);
        }
        prop_assert!(r.bubble >= -1e-12 && r.bubble < 1.0);
    }
}
