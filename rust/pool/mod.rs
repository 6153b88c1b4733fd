//! The memory pool: a caching allocator whose bookkeeping lives on the host, so it serves
//! host memory, device memory and simulated address spaces alike.
//!
//! - Requests round up to 512 B; small ones (≤ 1 MiB) share 2 MiB segments, larger ones
//!   get segments of their own rounded to 2 MiB, reused later by other large requests.
//! - Free blocks are indexed by a two-level segregated fit (`tlsf`) per stream and
//!   segment kind: O(1) insert, remove and near-best-fit search; free neighbours coalesce.
//!   Chosen over an ordered map keyed by (stream, size, address) by benchmark
//!   (`cargo bench --bench pool -- index`): taking the best fit out and putting a block
//!   back costs ~25 ns with TLSF against ~130–180 ns with a `BTreeSet` at 10³–10⁵ free
//!   blocks, and a block that shrinks or grows within its size class (the common case:
//!   requests are carved from the end of a free block) needs no index update at all.
//! - Streams follow PyTorch's caching allocator (see [`Pool`]): a freed block is reused
//!   only by its stream until [`Pool::synchronize`]; [`Pool::record_stream`] keeps a block
//!   used by other streams out of reuse until then.
//! - Statistics use `torch.cuda.memory_stats()` names ([`Stats`]); [`Pool::snapshot`]
//!   lists segments and blocks; [`replay`] replays traces and reports fragmentation.
//!
//! ```
//! use _core::pool::Pool;
//! let mut pool = Pool::host(None);
//! let a = pool.malloc(1000, 0).unwrap();
//! assert_eq!(pool.stats().allocated_bytes.all().current, 1024);
//! pool.free(a).unwrap();
//! assert!(pool.free(a).is_err()); // double free
//! pool.empty_cache();
//! assert_eq!(pool.stats().reserved_bytes.all().current, 0);
//! ```

mod addr_map;
mod allocator;
mod backing;
mod block;
mod error;
mod free_cache;
mod host_memory;
pub mod large_block_cache;
pub mod pluggable;
mod replay;
mod size;
mod stats;
mod tlsf;

#[cfg(test)]
mod tests;

pub use allocator::segment::SegmentKind;
pub use allocator::snapshot::{BlockInfo, SegmentInfo};
pub use allocator::{Policy, Pool, RESERVED_STREAM};
pub use backing::{ArenasOnly, Backing, HostBacking, Simulated};
pub use block::BlockState;
pub use error::PoolError;
pub use replay::{random_trace, replay, replay_on, ReplayReport, SplitMix64, TraceEvent};
pub use size::{GRANULE, SEGMENT_ROUND, SMALL_MAX};
pub use stats::{Stat, StatArray, StatPool, Stats};

/// The free-block index and its block type, public only for `benches/pool.rs`, which
/// compares it with an ordered map (the alternative the design weighed).
#[doc(hidden)]
pub mod index {
    pub use super::block::{Block, BlockState, NIL};
    pub use super::tlsf::Tlsf;
}
