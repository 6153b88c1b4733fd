//! Where segments come from.
//!
//! The pool's bookkeeping never touches the memory it manages (it only does arithmetic on
//! addresses), so one pool serves host memory, device memory or a simulated address space
//! alike; only the [`Backing`] knows what an address means.

use std::alloc::{alloc, dealloc, Layout};

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

/// Host memory from the global allocator, aligned to 2 MiB by default.
///
/// On Linux the segments are also advised to use transparent huge pages (as numpy does for
/// its large arrays): segments are 2 MiB multiples and 2 MiB aligned, so every page of them
/// can be a huge page, which makes first touches and every later pass over the memory cheaper
/// (one TLB entry per 2 MiB).
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
        let layout = Layout::from_size_align(size, self.align).ok()?;
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size (checked above); a null result is handled.
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            return None;
        }
        advise_huge_pages(ptr, size);
        Some(ptr as usize)
    }

    unsafe fn release(&mut self, base: usize, size: usize) {
        // The layout was valid when `obtain` built it from the same size and alignment.
        if let Ok(layout) = Layout::from_size_align(size, self.align) {
            // SAFETY: by this method's contract, `base` came from `alloc` with this layout
            // and has not been freed.
            unsafe { dealloc(base as *mut u8, layout) };
        }
    }

    fn alignment(&self) -> usize {
        self.align
    }

    fn name(&self) -> &'static str {
        "host"
    }
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn advise_huge_pages(ptr: *mut u8, size: usize) {
    use std::ffi::{c_int, c_void};
    extern "C" {
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }
    /// `MADV_HUGEPAGE` on Linux (asm-generic value, used by x86_64 and aarch64).
    const MADV_HUGEPAGE: c_int = 14;
    if (ptr as usize).is_multiple_of(4096) {
        // SAFETY: `ptr..ptr + size` is a page-aligned region we own; MADV_HUGEPAGE only
        // changes how the kernel backs it. Failure (e.g. THP disabled) is harmless: ignored.
        unsafe { madvise(ptr.cast::<c_void>(), size, MADV_HUGEPAGE) };
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn advise_huge_pages(_ptr: *mut u8, _size: usize) {}

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
