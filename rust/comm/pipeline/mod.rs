//! Pipeline-parallel schedules as pure data, and their simulator.
//!
//! A schedule says, for each of `ranks` pipeline ranks, the ordered list of [`Step`]s of one
//! training step: run the forward or the backward of micro-batch `mb` on local model chunk
//! `chunk`, send an activation (or an activation's gradient) to a peer, receive one. The
//! model is cut into `stages` consecutive pieces; every micro-batch runs through stage 0, 1,
//! …, `stages - 1` forward, then back. Each rank holds `chunks` of them
//! ([`Schedule::stage_of`]); which rank runs a micro-batch's stage is [`Schedule::locate`].
//!
//! - [`schedules`]: the compute order of each kind — GPipe (all forwards, then all
//!   backwards), 1F1B (PipeDream-Flush: `p − r − 1` warm-up forwards, then one forward one
//!   backward), interleaved 1F1B with `v` virtual stages per rank (Megatron-LM: stage
//!   `c·p + r` on rank `r`), and DualPipe (DeepSeek-V3: micro-batches fed from both ends,
//!   rank `r` holding stages `r` and `p − 1 − r`).
//! - [`build`] then inserts the communication: a `Recv` right before each compute whose
//!   input was produced on another rank, a `Send` right after each compute whose output is
//!   needed on another rank. Hand-offs between chunks of one rank need no message.
//! - [`sim`]: executes the lists on a cost model with non-blocking sends and blocking
//!   receives — the engine's semantics — and so proves a schedule can complete (every
//!   receive is eventually matched, no cycle of waits), and measures its step time, bubble
//!   and activations alive per rank.

pub mod schedules;
pub mod sim;

pub use sim::{simulate, PipeCost, PipeSimResult};

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Gpipe,
    OneFOneB,
    Interleaved,
    DualPipe,
}

impl Kind {
    /// The name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gpipe => "gpipe",
            Kind::OneFOneB => "1f1b",
            Kind::Interleaved => "interleaved",
            Kind::DualPipe => "dualpipe",
        }
    }

    /// The kind named `name` (as [`Kind::name`] spells it).
    pub fn parse(name: &str) -> Result<Kind, PipelineError> {
        match name {
            "gpipe" => Ok(Kind::Gpipe),
            "1f1b" => Ok(Kind::OneFOneB),
            "interleaved" => Ok(Kind::Interleaved),
            "dualpipe" => Ok(Kind::DualPipe),
            other => Err(PipelineError::BadConfig(format!(
                "schedule must be 'gpipe', '1f1b', 'interleaved' or 'dualpipe', got {other:?}"
            ))),
        }
    }
}

/// Forward (activations flow to the next stage) or backward (gradients flow back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pass {
    Forward,
    Backward,
}

/// One action of a rank. A message is named by the pass, the micro-batch and the stage that
/// produced it (`from_stage`): a forward message of stage `s` feeds stage `s + 1`, a backward
/// one feeds stage `s − 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Compute {
        pass: Pass,
        mb: usize,
        chunk: usize,
    },
    Send {
        pass: Pass,
        mb: usize,
        from_stage: usize,
        peer: usize,
    },
    Recv {
        pass: Pass,
        mb: usize,
        from_stage: usize,
        peer: usize,
    },
}

/// What building a schedule rejects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PipelineError {
    #[error("{0}")]
    BadConfig(String),
    #[error("{0}")]
    BadSchedule(String),
    #[error("deadlock: {0}")]
    Deadlock(String),
}

/// A schedule: who holds which stage, and each rank's steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: Kind,
    pub ranks: usize,
    pub micro_batches: usize,
    /// Model chunks per rank (1; `v` interleaved; 2 DualPipe).
    pub chunks: usize,
    /// Pieces the model is cut into (`ranks · v` interleaved, `ranks` otherwise).
    pub stages: usize,
    /// `placement[rank][chunk]`: the stage that chunk holds.
    pub placement: Vec<Vec<usize>>,
    /// `steps[rank]`: the rank's actions, in order.
    pub steps: Vec<Vec<Step>>,
}

impl Schedule {
    /// The stage rank `rank`'s chunk `chunk` holds.
    pub fn stage_of(&self, rank: usize, chunk: usize) -> usize {
        self.placement[rank][chunk]
    }

    /// (rank, chunk) that runs stage `stage` of micro-batch `mb`. DualPipe sends the first
    /// half of the micro-batches from rank 0 towards rank `p − 1` (stage `s` on rank `s`,
    /// chunk 0) and the second half the other way (stage `s` on rank `p − 1 − s`, chunk 1).
    pub fn locate(&self, mb: usize, stage: usize) -> (usize, usize) {
        locate(
            self.kind,
            self.ranks,
            self.micro_batches,
            self.stages,
            mb,
            stage,
        )
    }

    /// The message tag of a message: unique within a step for every (pass, mb, stage).
    pub fn tag(&self, pass: Pass, mb: usize, from_stage: usize) -> usize {
        (mb * self.stages + from_stage) * 2 + usize::from(pass == Pass::Backward)
    }
}

fn locate(
    kind: Kind,
    ranks: usize,
    micro_batches: usize,
    stages: usize,
    mb: usize,
    stage: usize,
) -> (usize, usize) {
    match kind {
        Kind::DualPipe if mb >= micro_batches / 2 => (ranks - 1 - stage, 1),
        Kind::DualPipe => (stage, 0),
        _ => {
            debug_assert!(stage < stages);
            (stage % ranks, stage / ranks)
        }
    }
}

/// The schedule `kind` for `ranks` pipeline ranks and `micro_batches` per step
/// (`virtual_stages` chunks per rank for [`Kind::Interleaved`], ignored otherwise).
///
/// Requirements: at least one rank and one micro-batch; interleaved needs
/// `virtual_stages ≥ 2` and `micro_batches` a multiple of `ranks` (as Megatron-LM);
/// DualPipe an even number of ranks and an even `micro_batches ≥ 2·ranks` (as the
/// DualPipe reference).
pub fn build(
    kind: Kind,
    ranks: usize,
    micro_batches: usize,
    virtual_stages: usize,
) -> Result<Schedule, PipelineError> {
    let bad = |s: String| Err(PipelineError::BadConfig(s));
    if ranks == 0 {
        return bad("the pipeline needs at least one rank".into());
    }
    if micro_batches == 0 {
        return bad("micro_batches must be >= 1".into());
    }
    let chunks = match kind {
        Kind::Interleaved => {
            if virtual_stages < 2 {
                return bad(format!(
                    "the interleaved schedule needs virtual_stages >= 2, got {virtual_stages}"
                ));
            }
            if !micro_batches.is_multiple_of(ranks) {
                return bad(format!(
                    "the interleaved schedule needs micro_batches ({micro_batches}) to be a \
                     multiple of the pipeline ranks ({ranks})"
                ));
            }
            virtual_stages
        }
        Kind::DualPipe => {
            if !ranks.is_multiple_of(2) {
                return bad(format!(
                    "DualPipe needs an even number of ranks, got {ranks}"
                ));
            }
            if !micro_batches.is_multiple_of(2) || micro_batches < 2 * ranks {
                return bad(format!(
                    "DualPipe needs an even micro_batches >= 2 x ranks ({}), got {micro_batches}",
                    2 * ranks
                ));
            }
            2
        }
        Kind::Gpipe | Kind::OneFOneB => 1,
    };
    let stages = if kind == Kind::Interleaved {
        ranks * chunks
    } else {
        ranks
    };
    let placement: Vec<Vec<usize>> = (0..ranks)
        .map(|r| match kind {
            Kind::DualPipe => vec![r, ranks - 1 - r],
            _ => (0..chunks).map(|c| c * ranks + r).collect(),
        })
        .collect();
    let mut schedule = Schedule {
        kind,
        ranks,
        micro_batches,
        chunks,
        stages,
        placement,
        steps: Vec::with_capacity(ranks),
    };
    for rank in 0..ranks {
        let order = schedules::compute_order(kind, ranks, rank, micro_batches, chunks);
        let steps = with_messages(&schedule, rank, &order);
        schedule.steps.push(steps);
    }
    Ok(schedule)
}

/// `order` (computes only) with a receive before each compute fed from another rank and a
/// send after each compute that feeds another rank.
fn with_messages(s: &Schedule, rank: usize, order: &[(Pass, usize, usize)]) -> Vec<Step> {
    let mut steps = Vec::with_capacity(order.len() * 3);
    for &(pass, mb, chunk) in order {
        let stage = s.stage_of(rank, chunk);
        let (input, output) = match pass {
            Pass::Forward => (
                stage.checked_sub(1),
                (stage + 1 < s.stages).then_some(stage + 1),
            ),
            Pass::Backward => (
                (stage + 1 < s.stages).then_some(stage + 1),
                stage.checked_sub(1),
            ),
        };
        if let Some(from) = input {
            let (peer, _) = s.locate(mb, from);
            if peer != rank {
                steps.push(Step::Recv {
                    pass,
                    mb,
                    from_stage: from,
                    peer,
                });
            }
        }
        steps.push(Step::Compute { pass, mb, chunk });
        if let Some(to) = output {
            let (peer, _) = s.locate(mb, to);
            if peer != rank {
                steps.push(Step::Send {
                    pass,
                    mb,
                    from_stage: stage,
                    peer,
                });
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests;
