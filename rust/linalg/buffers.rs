//! Output buffers of the kernels whose size comes from the caller, allocated without
//! aborting, and without zeroing what the kernel overwrites anyway.
//!
//! `vec![0.0; n]` aborts the process when the allocator says no; an output sized by user
//! input (a huge `pad_to`, a wide `w`, many rows of `x`) must instead become an error the
//! caller can catch. Each kernel family turns [`OutOfMemory`] into its own error enum.

use std::alloc::{alloc_zeroed, Layout};
use std::mem::MaybeUninit;

/// An output buffer could not be allocated: `what` names it, `bytes` is what it needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfMemory {
    pub what: &'static str,
    pub bytes: usize,
}

/// Element types whose all-zero bit pattern is the value zero.
pub(crate) trait ZeroBits: Copy {}
impl ZeroBits for f32 {}
impl ZeroBits for i32 {}

/// A vector of `len` zeros, or [`OutOfMemory`] naming `what`. Like `vec![0; len]`
/// it asks the allocator for zeroed memory (calloc), so large buffers cost no memset.
pub(crate) fn zeroed<T: ZeroBits>(what: &'static str, len: usize) -> Result<Vec<T>, OutOfMemory> {
    let too_large = || OutOfMemory {
        what,
        bytes: len.saturating_mul(size_of::<T>()),
    };
    let layout = Layout::array::<T>(len).map_err(|_| too_large())?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout has a non-zero size, as `alloc_zeroed` requires.
    let ptr = unsafe { alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(too_large());
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `[T; len]`, which is
    // the layout `Vec<T>` uses for capacity `len`; all `len` elements are initialised, as
    // zero bits are a valid `T` (`ZeroBits`).
    let mut v = unsafe { Vec::from_raw_parts(ptr, len, len) };
    // A large calloc is fresh mmap'd memory whose pages fault in on first touch (the GEMM
    // outputs of the MoE FFN: ~80 MB a step): huge pages make that a few dozen faults.
    advise_huge_pages_at(v.as_mut_ptr() as usize, std::mem::size_of_val(v.as_slice()));
    Ok(v)
}

/// A vector of `len` elements written by `fill`, without zeroing them first (for outputs
/// the kernel overwrites completely: a memset of a large reused buffer costs as much as the
/// gather itself). [`OutOfMemory`] naming `what` if it cannot be allocated.
///
/// # Safety
/// `fill` must initialise every element of the slice it is given (it may panic: the
/// vector is then dropped with length 0, leaking nothing and reading nothing).
pub(crate) unsafe fn filled<T: ZeroBits>(
    what: &'static str,
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>]),
) -> Result<Vec<T>, OutOfMemory> {
    let mut v = reserved(what, len)?;
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: capacity >= len (reserved above) and the caller guarantees `fill` initialised
    // all `len` elements.
    unsafe { v.set_len(len) };
    Ok(v)
}

/// As [`filled`], for two outputs written by one pass (`fill` gets both): neither is
/// zeroed first, and if either cannot be allocated nothing is run.
///
/// # Safety
/// `fill` must initialise every element of both slices it is given.
pub(crate) unsafe fn filled_pair<T: ZeroBits>(
    what: (&'static str, &'static str),
    len: (usize, usize),
    fill: impl FnOnce(&mut [MaybeUninit<T>], &mut [MaybeUninit<T>]),
) -> Result<(Vec<T>, Vec<T>), OutOfMemory> {
    let (mut a, mut b) = (reserved(what.0, len.0)?, reserved(what.1, len.1)?);
    fill(
        &mut a.spare_capacity_mut()[..len.0],
        &mut b.spare_capacity_mut()[..len.1],
    );
    // SAFETY: both capacities are at least their lengths (reserved above) and the caller
    // guarantees `fill` initialised every element of both.
    unsafe {
        a.set_len(len.0);
        b.set_len(len.1);
    }
    Ok((a, b))
}

/// An empty vector with room for `len` elements (huge pages advised when large), or
/// [`OutOfMemory`] naming `what`.
fn reserved<T>(what: &'static str, len: usize) -> Result<Vec<T>, OutOfMemory> {
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| OutOfMemory {
        what,
        bytes: len.saturating_mul(size_of::<T>()),
    })?;
    advise_huge_pages(v.spare_capacity_mut());
    Ok(v)
}

/// `y` viewed as possibly uninitialised floats, for kernels that only store into it (so one
/// driver serves both a caller's buffer and a fresh one from [`filled`]).
pub(crate) fn as_uninit(y: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the size, alignment and validity of `f32`, and the
    // drivers handed this view only ever store initialised floats through it, so `y` is still
    // fully initialised when the borrow ends.
    unsafe { &mut *(std::ptr::from_mut::<[f32]>(y) as *mut [MaybeUninit<f32>]) }
}

/// `y` as initialised floats, once a kernel has stored into every element.
///
/// # Safety
/// Every element of `y` must have been written.
pub(crate) unsafe fn assume_init(y: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller guarantees every
    // element is initialised.
    unsafe { &mut *(std::ptr::from_mut::<[MaybeUninit<f32>]>(y) as *mut [f32]) }
}

/// Asks Linux to back `buf` with transparent huge pages (as numpy does for arrays of 4 MiB and
/// more): a fresh buffer then costs a few 2 MiB page faults instead of hundreds of 4 KiB ones,
/// which on a virtual machine dominate a gather's time. Only advice: failure is ignored.
fn advise_huge_pages<T>(buf: &mut [MaybeUninit<T>]) {
    advise_huge_pages_at(buf.as_mut_ptr() as usize, std::mem::size_of_val(buf));
}

/// [`advise_huge_pages`] for the `bytes` bytes at address `start`, memory the caller owns.
fn advise_huge_pages_at(start: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    {
        /// Buffers at least this large ask for huge pages (numpy's threshold too).
        const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;
        if bytes < HUGE_PAGE_MIN_BYTES {
            return;
        }
        const PAGE: usize = 4096;
        let first = start.div_ceil(PAGE) * PAGE;
        let end = (start + bytes) / PAGE * PAGE;
        if end > first {
            // SAFETY: [first, end) is page-aligned and lies inside the buffer, memory this process
            // owns; MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

/// Writes a zero into every 4 KiB page of the `len` floats at `ptr`, so that the OS maps (and
/// zeroes) fresh pages now, on this thread, rather than when a kernel first stores into them.
///
/// # Safety
/// The `len` floats at `ptr` must be valid for writes, and nobody else may access them
/// meanwhile; the caller overwrites them afterwards (the zeros are not a result).
pub(crate) unsafe fn fault_in(ptr: *mut f32, len: usize) {
    const FLOATS_PER_PAGE: usize = 4096 / 4;
    for at in (0..len).step_by(FLOATS_PER_PAGE) {
        // SAFETY: at < len, inside the range the caller vouches for.
        unsafe { ptr.add(at).write(0.0) };
    }
    if len > 0 {
        // SAFETY: as above; the last float's page, which the stride may have stepped over.
        unsafe { ptr.add(len - 1).write(0.0) };
    }
}

/// Writes `src` into `dst` (same length), element by element (the compiler turns it into a
/// vectorised copy).
#[inline]
pub(crate) fn write_copy(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
}

/// Writes `w · src` into `dst`.
#[inline]
pub(crate) fn write_scaled(dst: &mut [MaybeUninit<f32>], w: f32, src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(w * s);
    }
}

/// Writes zeros into `dst`.
#[inline]
pub(crate) fn write_zeros<T: ZeroBits + Default>(dst: &mut [MaybeUninit<T>]) {
    for d in dst {
        d.write(T::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_buffers_and_refusals() {
        let v: Vec<f32> = zeroed("x", 1000).unwrap();
        assert_eq!(v.len(), 1000);
        assert!(v.iter().all(|&x| x == 0.0));
        assert!(zeroed::<i32>("x", 0).unwrap().is_empty());
        let err = zeroed::<f32>("x_sorted", usize::MAX / 2).unwrap_err();
        assert_eq!(err.what, "x_sorted");
    }

    #[test]
    fn filled_buffers_hold_what_fill_wrote() {
        let src = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        // SAFETY: the closure writes all 5 elements.
        let v: Vec<f32> = unsafe { filled("x", 5, |s| write_scaled(s, 2.0, &src)) }.unwrap();
        assert_eq!(v, vec![2.0, 4.0, 6.0, 8.0, 10.0]);
        // SAFETY: the closure writes all 3 elements.
        let z: Vec<i32> = unsafe { filled("x", 3, write_zeros) }.unwrap();
        assert_eq!(z, vec![0, 0, 0]);
        // SAFETY: the closure writes all 2 elements.
        let c: Vec<f32> = unsafe { filled("x", 2, |s| write_copy(s, &src[..2])) }.unwrap();
        assert_eq!(c, vec![1.0, 2.0]);
        // SAFETY: never called: the reservation fails first.
        let err = unsafe { filled::<f32>("y", usize::MAX / 2, |_| unreachable!()) }.unwrap_err();
        assert_eq!(err.what, "y");
        // SAFETY: the closure writes all 2 + 3 elements.
        let (a, b): (Vec<f32>, Vec<f32>) = unsafe {
            filled_pair(("a", "b"), (2, 3), |a, b| {
                write_copy(a, &src[..2]);
                write_scaled(b, 3.0, &src[..3]);
            })
        }
        .unwrap();
        assert_eq!((a, b), (vec![1.0, 2.0], vec![3.0, 6.0, 9.0]));
        // SAFETY: never called: the second reservation fails first.
        let err =
            unsafe { filled_pair::<f32>(("a", "b"), (4, usize::MAX / 2), |_, _| unreachable!()) }
                .unwrap_err();
        assert_eq!(err.what, "b");
    }
}
