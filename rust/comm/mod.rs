//! The communication scheduler: which gradient bytes go out when, and how.
//!
//! It never touches the network. It knows the gradients (name, size, dtype, layer), groups
//! them into buckets, and — fed "gradient i is ready" events during backward — answers with
//! the operations to launch now, and which earlier operation must complete first. The process
//! group (Python, `moecore.dist`) moves the bytes.
//!
//! - [`bucket`]: PyTorch DDP's bucketing: reverse registration order, a small first bucket
//!   (1 MiB) so communication starts early, a cap (25 MiB) for the others, one dtype per
//!   bucket; rebuilt once from the ready order observed in the first step.
//! - [`transport`]: per bucket, dense all-reduce or top-k compressed all-gather, from the
//!   bytes each moves per rank (ring all-reduce ≈ 2·(P−1)/P·n·s, all-gather of top-k ≈
//!   (P−1)·k·8), after dense warm-up steps.
//! - [`policy`]: `fifo` (buckets in order, as DDP) or `priority` (ByteScheduler's
//!   partitioning of buckets above a size and credit of bytes in flight; see
//!   [`scheduler::Scheduler`] for why its lowest-layer-first order is left out).
//! - [`scheduler`]: the per-step state machine.
//! - [`sim`]: the step-time simulator, replaying the scheduler's decisions on a cost model.
//!
//! Every decision depends only on the configuration and on the order in which buckets
//! complete *in bucket order*, never on timing, so every rank issues the same collectives in
//! the same order — which MPI requires — even when ranks see gradients ready at different
//! times or some gradients never become ready (they are flushed, as zeros, at `finish`).

pub mod bucket;
pub mod pipeline;
pub mod policy;
pub mod scheduler;
pub mod sim;
pub mod transport;

pub use bucket::{assign_buckets, Bucket, BucketConfig, GradInfo, Slice};
pub use policy::{plan_ops, Op, Policy};
pub use scheduler::{Action, Scheduler, SchedulerConfig};
pub use sim::{
    simulate, simulate_sharded, CostModel, Link, Sharding, SimResult, StepProfile, Unit,
};
pub use transport::{choose_transport, CompressPlan, CompressWhen, Transport};

/// What the scheduler rejects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommError {
    #[error("no gradients registered")]
    Empty,
    #[error("gradient {index} ({name:?}) has {what}")]
    BadGrad {
        index: usize,
        name: String,
        what: String,
    },
    #[error("gradient index {index} out of range (there are {count})")]
    NoSuchGrad { index: usize, count: usize },
    #[error("gradient {index} ({name:?}) reported ready twice in one step")]
    ReadyTwice { index: usize, name: String },
    #[error("{0}")]
    BadConfig(String),
    #[error("{0}")]
    BadOrder(String),
    #[error("{0}")]
    BadState(&'static str),
}

#[cfg(test)]
mod proptests;
