//! Zeroed output buffers whose size comes from the caller, allocated without aborting.
//!
//! `vec![0.0; n]` aborts the process when the allocator says no; an output sized by user
//! input (a huge `pad_to`, a wide `w`) must instead become an error the caller can catch.

use std::alloc::{alloc_zeroed, Layout};

use super::error::MoeError;

/// Element types whose all-zero bit pattern is the value zero.
pub(crate) trait ZeroBits: Copy {}
impl ZeroBits for f32 {}
impl ZeroBits for i32 {}

/// A vector of `len` zeros, or [`MoeError::OutOfMemory`] naming `what`. Like `vec![0; len]`
/// it asks the allocator for zeroed memory (calloc), so large buffers cost no memset.
pub(crate) fn zeroed<T: ZeroBits>(what: &'static str, len: usize) -> Result<Vec<T>, MoeError> {
    let too_large = || MoeError::OutOfMemory {
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
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
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
        assert!(matches!(
            err,
            MoeError::OutOfMemory {
                what: "x_sorted",
                ..
            }
        ));
    }
}
