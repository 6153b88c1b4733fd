//! Host memory for segments, straight from the operating system where we can.
//!
//! On Linux (x86_64, aarch64) segments are anonymous private mappings, aligned by mapping a
//! little more and unmapping the excess, and advised to use transparent huge pages (as numpy
//! does for its large arrays): a 2 MiB-aligned segment can then be backed entirely by huge
//! pages, which makes the first touch and every later pass over it cheaper. Nothing touches a
//! fresh mapping until the caller writes to it. (Going through malloc instead would put
//! allocator headers inside huge-page-advised regions, and every new segment would pay for
//! faulting in and zeroing a whole 2 MiB page at once.) Elsewhere, `std::alloc` is used.

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod imp {
    use std::ffi::{c_int, c_long, c_void};

    extern "C" {
        fn mmap(
            addr: *mut c_void,
            len: usize,
            prot: c_int,
            flags: c_int,
            fd: c_int,
            offset: c_long,
        ) -> *mut c_void;
        fn munmap(addr: *mut c_void, len: usize) -> c_int;
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }

    // Linux values shared by x86_64 and aarch64 (asm-generic).
    const PROT_READ: c_int = 1;
    const PROT_WRITE: c_int = 2;
    const MAP_PRIVATE: c_int = 0x02;
    const MAP_ANONYMOUS: c_int = 0x20;
    const MADV_HUGEPAGE: c_int = 14;
    const PAGE: usize = 4096;

    /// A fresh anonymous read-write mapping of `len` bytes, or `None`.
    fn map_anonymous(len: usize) -> Option<*mut c_void> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing has no
        // preconditions; failure is reported as MAP_FAILED (-1), checked below.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p as isize != -1 && !p.is_null()).then_some(p)
    }

    /// Maps `size` bytes (a multiple of the page size) aligned to `align` (a power of two).
    pub fn map(size: usize, align: usize) -> Option<usize> {
        let align = align.max(PAGE);
        // Recent kernels place large anonymous mappings on huge-page boundaries by
        // themselves: try the exact size first, and over-map only if that is misaligned.
        let p = map_anonymous(size)?;
        if (p as usize).is_multiple_of(align) {
            advise(p, size);
            return Some(p as usize);
        }
        // SAFETY: `p` is the mapping of `size` bytes just made, unused.
        unsafe { munmap(p, size) };
        let total = size.checked_add(align)?;
        let p = map_anonymous(total)?;
        let raw = p as usize;
        let start = (raw + align - 1) & !(align - 1);
        let head = start - raw;
        let tail = total - head - size;
        // SAFETY: `[raw, raw + head)` and `[start + size, raw + total)` are page-aligned
        // parts of the mapping just made (mmap returns page-aligned addresses; `align`,
        // `size` and so `head` and `tail` are page multiples) that nothing uses.
        unsafe {
            if head > 0 {
                munmap(p, head);
            }
            if tail > 0 {
                munmap((start + size) as *mut c_void, tail);
            }
        }
        advise(start as *mut c_void, size);
        Some(start)
    }

    fn advise(p: *mut c_void, size: usize) {
        // SAFETY: `p..p + size` is a mapping we own; MADV_HUGEPAGE only changes how the
        // kernel backs it, and a failure (THP off) is harmless.
        unsafe { madvise(p, size, MADV_HUGEPAGE) };
    }

    /// Unmaps a region returned by [`map`].
    ///
    /// # Safety
    /// `base`/`size` must be exactly one earlier `map` result, not unmapped yet and unused.
    pub unsafe fn unmap(base: usize, size: usize, _align: usize) {
        // SAFETY: by this function's contract.
        unsafe { munmap(base as *mut c_void, size) };
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod imp {
    use std::alloc::{alloc, dealloc, Layout};

    /// Allocates `size` bytes aligned to `align` from the global allocator.
    pub fn map(size: usize, align: usize) -> Option<usize> {
        let layout = Layout::from_size_align(size, align).ok()?;
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size (checked above); null is handled.
        let p = unsafe { alloc(layout) };
        (!p.is_null()).then_some(p as usize)
    }

    /// Frees a region returned by [`map`].
    ///
    /// # Safety
    /// `base`/`size`/`align` must be exactly one earlier `map` call's, not freed yet, unused.
    pub unsafe fn unmap(base: usize, size: usize, align: usize) {
        if let Ok(layout) = Layout::from_size_align(size, align) {
            // SAFETY: by this function's contract, `base` came from `alloc` with `layout`.
            unsafe { dealloc(base as *mut u8, layout) };
        }
    }
}

pub use imp::{map, unmap};
