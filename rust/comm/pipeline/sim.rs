//! Executes a [`Schedule`] on a cost model: the proof that it can complete, and its time.
//!
//! The semantics are the engine's: a rank runs its steps in order; a `Send` is posted and
//! never blocks (the engine's non-blocking send, waited for at the end of the step); a
//! `Recv` blocks until the matching send was posted and the message arrived (`latency_s +
//! transfer_s` after it). Before timing anything the lists are checked: every send has
//! exactly one matching receive on its peer and the reverse, every (pass, micro-batch,
//! stage) is computed exactly once on the rank [`Schedule::locate`] names, and every compute
//! finds its input already computed on the rank or received. If ranks remain whose next
//! step can never run, that is a deadlock, reported with what each blocked rank waits for.

use std::collections::{HashMap, HashSet};

use super::{Pass, PipelineError, Schedule, Step};

/// Where the time of a pipeline step goes.
#[derive(Debug, Clone, PartialEq)]
pub struct PipeCost {
    /// Seconds of one micro-batch's forward through each stage (`len = stages`).
    pub forward_s: Vec<f64>,
    /// Seconds of one micro-batch's backward through each stage.
    pub backward_s: Vec<f64>,
    /// Seconds from a send being posted until its first byte arrives.
    pub latency_s: f64,
    /// Seconds to move one message (an activation or its gradient).
    pub transfer_s: f64,
}

impl PipeCost {
    /// Every stage takes `forward_s` and `backward_s`; messages are free.
    pub fn uniform(stages: usize, forward_s: f64, backward_s: f64) -> PipeCost {
        PipeCost {
            forward_s: vec![forward_s; stages],
            backward_s: vec![backward_s; stages],
            latency_s: 0.0,
            transfer_s: 0.0,
        }
    }
}

/// What one simulated step measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PipeSimResult {
    /// The last rank's finishing time.
    pub step_s: f64,
    /// Compute seconds per rank.
    pub busy_s: Vec<f64>,
    /// `1 − Σ busy / (ranks · step)`: the step's idle share.
    pub bubble: f64,
    /// Most (micro-batch, chunk) pairs between forward and backward at once, per rank.
    pub peak_alive: Vec<usize>,
    /// Messages sent in the step.
    pub messages: usize,
}

type MsgKey = (Pass, usize, usize);

/// Checks `s` and runs it on `cost`.
pub fn simulate(s: &Schedule, cost: &PipeCost) -> Result<PipeSimResult, PipelineError> {
    if cost.forward_s.len() != s.stages || cost.backward_s.len() != s.stages {
        return Err(PipelineError::BadConfig(format!(
            "the cost model has {} forward and {} backward times for {} stages",
            cost.forward_s.len(),
            cost.backward_s.len(),
            s.stages
        )));
    }
    check(s)?;
    let ranks = s.ranks;
    let mut time = vec![0.0f64; ranks];
    let mut next = vec![0usize; ranks];
    let mut busy = vec![0.0f64; ranks];
    let mut alive = vec![0usize; ranks];
    let mut peak = vec![0usize; ranks];
    // (key, receiver) → arrival time.
    let mut posted: HashMap<(MsgKey, usize), f64> = HashMap::new();
    let mut messages = 0;
    loop {
        let mut progressed = false;
        for r in 0..ranks {
            while let Some(step) = s.steps[r].get(next[r]) {
                match *step {
                    Step::Compute { pass, mb: _, chunk } => {
                        let stage = s.stage_of(r, chunk);
                        let dt = match pass {
                            Pass::Forward => {
                                alive[r] += 1;
                                peak[r] = peak[r].max(alive[r]);
                                cost.forward_s[stage]
                            }
                            Pass::Backward => {
                                alive[r] -= 1;
                                cost.backward_s[stage]
                            }
                        };
                        time[r] += dt;
                        busy[r] += dt;
                    }
                    Step::Send {
                        pass,
                        mb,
                        from_stage,
                        peer,
                    } => {
                        let arrival = time[r] + cost.latency_s + cost.transfer_s;
                        posted.insert(((pass, mb, from_stage), peer), arrival);
                        messages += 1;
                    }
                    Step::Recv {
                        pass,
                        mb,
                        from_stage,
                        ..
                    } => match posted.get(&((pass, mb, from_stage), r)) {
                        Some(&arrival) => time[r] = time[r].max(arrival),
                        None => break,
                    },
                }
                next[r] += 1;
                progressed = true;
            }
        }
        if (0..ranks).all(|r| next[r] == s.steps[r].len()) {
            break;
        }
        if !progressed {
            let blocked: Vec<String> = (0..ranks)
                .filter(|&r| next[r] < s.steps[r].len())
                .map(|r| {
                    format!(
                        "rank {r} waits at step {} ({:?})",
                        next[r], s.steps[r][next[r]]
                    )
                })
                .collect();
            return Err(PipelineError::Deadlock(blocked.join("; ")));
        }
    }
    let step_s = time.iter().copied().fold(0.0, f64::max);
    let total_busy: f64 = busy.iter().sum();
    let bubble = if step_s > 0.0 {
        1.0 - total_busy / (ranks as f64 * step_s)
    } else {
        0.0
    };
    Ok(PipeSimResult {
        step_s,
        busy_s: busy,
        bubble,
        peak_alive: peak,
        messages,
    })
}

/// The static checks: matched messages, complete and correctly placed computes, inputs
/// present before each compute and each send.
pub fn check(s: &Schedule) -> Result<(), PipelineError> {
    let bad = |msg: String| Err(PipelineError::BadSchedule(msg));
    if s.steps.len() != s.ranks {
        return bad(format!(
            "{} step lists for {} ranks",
            s.steps.len(),
            s.ranks
        ));
    }
    let mut sends: HashMap<(MsgKey, usize, usize), usize> = HashMap::new();
    let mut recvs: HashMap<(MsgKey, usize, usize), usize> = HashMap::new();
    let mut computed: HashSet<(Pass, usize, usize)> = HashSet::new();
    for (r, steps) in s.steps.iter().enumerate() {
        // What this rank holds so far: outputs it computed or received, keyed by
        // (pass, mb, producing stage), and the forwards it ran.
        let mut have: HashSet<MsgKey> = HashSet::new();
        for (i, step) in steps.iter().enumerate() {
            let at = format!("rank {r} step {i} ({step:?})");
            match *step {
                Step::Compute { pass, mb, chunk } => {
                    if mb >= s.micro_batches || chunk >= s.chunks {
                        return bad(format!("{at}: no such micro-batch or chunk"));
                    }
                    let stage = s.stage_of(r, chunk);
                    if s.locate(mb, stage) != (r, chunk) {
                        return bad(format!(
                            "{at}: stage {stage} of this micro-batch runs elsewhere"
                        ));
                    }
                    if !computed.insert((pass, mb, stage)) {
                        return bad(format!("{at}: computed twice"));
                    }
                    let needs: Vec<MsgKey> = match pass {
                        Pass::Forward => stage
                            .checked_sub(1)
                            .map(|f| (Pass::Forward, mb, f))
                            .into_iter()
                            .collect(),
                        Pass::Backward => {
                            let mut v = vec![(Pass::Forward, mb, stage)];
                            if stage + 1 < s.stages {
                                v.push((Pass::Backward, mb, stage + 1));
                            }
                            v
                        }
                    };
                    if let Some(missing) = needs.iter().find(|k| !have.contains(k)) {
                        return bad(format!("{at}: its input {missing:?} is not here yet"));
                    }
                    have.insert((pass, mb, stage));
                }
                Step::Send {
                    pass,
                    mb,
                    from_stage,
                    peer,
                } => {
                    if peer >= s.ranks || peer == r {
                        return bad(format!("{at}: bad peer"));
                    }
                    if !have.contains(&(pass, mb, from_stage)) {
                        return bad(format!("{at}: sends what it has not computed"));
                    }
                    *sends.entry(((pass, mb, from_stage), r, peer)).or_default() += 1;
                }
                Step::Recv {
                    pass,
                    mb,
                    from_stage,
                    peer,
                } => {
                    if peer >= s.ranks || peer == r {
                        return bad(format!("{at}: bad peer"));
                    }
                    *recvs.entry(((pass, mb, from_stage), peer, r)).or_default() += 1;
                    have.insert((pass, mb, from_stage));
                }
            }
        }
    }
    let expected = 2 * s.micro_batches * s.stages;
    if computed.len() != expected {
        return bad(format!(
            "{} of the {expected} forward and backward computes are scheduled",
            computed.len()
        ));
    }
    for (key, n) in &sends {
        if *n != 1 || recvs.get(key) != Some(&1) {
            return bad(format!(
                "message {:?} from rank {} to rank {}: sent {n} times, received {} times",
                key.0,
                key.1,
                key.2,
                recvs.get(key).copied().unwrap_or(0)
            ));
        }
    }
    if let Some(key) = recvs.keys().find(|k| !sends.contains_key(*k)) {
        return bad(format!(
            "message {:?} from rank {} to rank {} is received but never sent",
            key.0, key.1, key.2
        ));
    }
    Ok(())
}
