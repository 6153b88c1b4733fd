//! Where segments come from.
//!
//! The pool's bookkeeping never touches the memory it manages (it only does arithmetic on
//! addresses), so one pool serves host memory, device memory or a simulated address space
//! alike; only the [`Backing`] knows what an address means.

use super::host_memory;

/// A source of segments for a [`Pool`](super::Pool).
pub trait Backing: Send {
    /// Obtains `size` bytes (a multiple of 2 MiB) aligned to at least [`Backing::alignment`],
    /// returning the base address, or `None` if the backing cannot supply them.
    fn obtain(&mut self, size: usize) -> Option<usize>;

    /// Gives back a region obtained from [`Backing::obtain`].
    ///
    /// # Safety
    /// `base` and `size` must be exactly those of one earlier successful `obtain` on this
    /// backing, not released yet, and nothing may use the region afterwards.
    unsafe fn release(&mut self, base: usize, size: usize);

    /// The alignment of every base address `obtain` returns (a power of two).
    fn alignment(&self) -> usize;

    /// A short name for messages ("host", "arenas only", "simulated").
    fn name(&self) -> &'static str;
}

/// Host memory, in segments aligned to 2 MiB by default (see [`host_memory`](super::host_memory):
/// fresh anonymous mappings advised to use huge pages on Linux, `std::alloc` elsewhere).
#[derive(Debug)]
pub struct HostBacking {
    align: usize,
}

impl HostBacking {
    /// The default segment alignment: 2 MiB, the huge-page size, so whole segments can be
    /// backed by huge pages (blocks inside are 512 B aligned).
    pub const DEFAULT_ALIGN: usize = super::size::SEGMENT_ROUND;

    /// A host backing whose segments are aligned to `align` bytes (a power of two ≥ 64;
    /// smaller values are raised to 64).
    pub fn new(align: usize) -> Option<Self> {
        align.is_power_of_two().then_some(Self {
            align: align.max(64),
        })
    }
}

impl Default for HostBacking {
    fn default() -> Self {
        Self {
            align: Self::DEFAULT_ALIGN,
        }
    }
}

impl Backing for HostBacking {
    fn obtain(&mut self, size: usize) -> Option<usize> {
        if size == 0 {
            return None;
        }
        host_memory::map(size, self.align)
    }

    unsafe fn release(&mut self, base: usize, size: usize) {
        // SAFETY: by this method's contract, `base`/`size` are one earlier `obtain` result
        // (made by `map` with `self.align`), released once, no longer used.
        unsafe { host_memory::unmap(base, size, self.align) };
    }

    fn alignment(&self) -> usize {
        self.align
    }

    fn name(&self) -> &'static str {
        "host"
    }
}

/// A backing that supplies nothing: the pool serves only arenas registered with
/// [`Pool::register_arena`](super::Pool::register_arena).
#[derive(Debug, Default)]
pub struct ArenasOnly;

impl Backing for ArenasOnly {
    fn obtain(&mut self, _size: usize) -> Option<usize> {
        None
    }

    unsafe fn release(&mut self, _base: usize, _size: usize) {}

    fn alignment(&self) -> usize {
        super::size::SEGMENT_ROUND
    }

    fn name(&self) -> &'static str {
        "arenas only"
    }
}

/// A simulated address space: hands out fresh, never reused address ranges and no memory.
/// Lets trace replays and property tests exercise the pool at any scale without touching RAM.
#[derive(Debug)]
pub struct Simulated {
    next: usize,
    held: usize,
    /// `obtain` fails when more than this many bytes would be held (to test OOM paths).
    budget: usize,
}

impl Simulated {
    /// A simulated backing that never runs out (within the address space).
    pub fn new() -> Self {
        Self::with_budget(usize::MAX)
    }

    /// A simulated backing that refuses to hold more than `budget` bytes at once.
    pub fn with_budget(budget: usize) -> Self {
        Self {
            next: 1 << 40,
            held: 0,
            budget,
        }
    }
}

impl Default for Simulated {
    fn default() -> Self {
        Self::new()
    }
}

impl Backing for Simulated {
    fn obtain(&mut self, size: usize) -> Option<usize> {
        let held = self.held.checked_add(size)?;
        if held > self.budget {
            return None;
        }
        let base = self.next;
        self.next = super::size::round_up(base.checked_add(size)?, super::size::SEGMENT_ROUND)?;
        self.held = held;
        Some(base)
    }

    unsafe fn release(&mut self, _base: usize, size: usize) {
        self.held -= size;
    }

    fn alignment(&self) -> usize {
        super::size::SEGMENT_ROUND
    }

    fn name(&self) -> &'static str {
        "simulated"
    }
}
