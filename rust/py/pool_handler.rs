//! A numpy memory handler (NEP 49) backed by a pool, so pool arrays own their data.
//!
//! numpy ≥ 1.22 lets every array carry the handler that frees its data
//! (`PyArrayObject_fields.mem_handler`, a capsule named "mem_handler" holding a
//! `PyDataMem_Handler`). An array made over a pool block with `OWNDATA` set and this handler
//! attached is an ordinary owning numpy array: views keep it alive through `.base`, and when
//! it dies numpy calls the handler's `free`, which returns the block to the pool. No extra
//! Python object per array, no `.base` trick.
//!
//! The handler's context is a strong reference to the pool (`Arc<Mutex<Pool>>`), released by
//! the capsule's destructor; every array holds a reference to the capsule, so the pool lives
//! as long as any of its arrays.

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use numpy::npyffi::{self, NPY_ARRAY_OWNDATA};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::pool::Pool;

/// numpy's `PyDataMemAllocator`.
#[repr(C)]
struct Allocator {
    ctx: *mut c_void,
    malloc: unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
    calloc: unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void,
    realloc: unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void,
    free: unsafe extern "C" fn(*mut c_void, *mut c_void, usize),
}

/// numpy's `PyDataMem_Handler`.
#[repr(C)]
struct Handler {
    name: [c_char; 127],
    version: u8,
    allocator: Allocator,
}

/// The fields numpy ≥ 1.22 has after those rust-numpy's `PyArrayObject` declares
/// (`PyArrayObject_fields` in numpy's `ndarraytypes.h`).
#[repr(C)]
struct ArrayFields {
    head: npyffi::PyArrayObject,
    buffer_info: *mut c_void,
    mem_handler: *mut ffi::PyObject,
}

const CAPSULE_NAME: &std::ffi::CStr = c"mem_handler";
/// The handler name numpy reports (`numpy.core.multiarray.get_handler_name(a)`).
pub const HANDLER_NAME: &str = "moecore_pool";
/// The first numpy C-API feature version with per-array memory handlers (numpy 1.22).
const NPY_1_22_API_VERSION: u32 = 0x0000_000f;

/// Runs `f` on the pool behind `ctx`; `None` if the lock is poisoned or `f` panics (numpy's
/// callbacks must not unwind into C).
///
/// # Safety
/// `ctx` must be the `Arc::into_raw` pointer stored by [`new_capsule`], still alive.
unsafe fn with_pool<T>(ctx: *mut c_void, f: impl FnOnce(&mut Pool) -> Option<T>) -> Option<T> {
    // SAFETY: by the contract, `ctx` points to a live `Mutex<Pool>` (the capsule holds it).
    let pool = unsafe { &*(ctx as *const Mutex<Pool>) };
    catch_unwind(AssertUnwindSafe(|| {
        let mut guard = pool.lock().ok()?;
        f(&mut guard)
    }))
    .ok()
    .flatten()
}

unsafe extern "C" fn h_malloc(ctx: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: numpy passes back the context of this handler.
    unsafe { with_pool(ctx, |p| p.malloc_handle(size.max(1), 0).ok()) }
        .map_or(std::ptr::null_mut(), |a| a as *mut c_void)
}

unsafe extern "C" fn h_calloc(ctx: *mut c_void, nelem: usize, elsize: usize) -> *mut c_void {
    let Some(size) = nelem.checked_mul(elsize) else {
        return std::ptr::null_mut();
    };
    // SAFETY: as in `h_malloc`.
    let ptr = unsafe { h_malloc(ctx, size) };
    if !ptr.is_null() {
        // SAFETY: `ptr` is a fresh block of at least `size` bytes of host memory.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, size) };
    }
    ptr
}

unsafe extern "C" fn h_realloc(ctx: *mut c_void, ptr: *mut c_void, new_size: usize) -> *mut c_void {
    if ptr.is_null() {
        // SAFETY: as in `h_malloc`.
        return unsafe { h_malloc(ctx, new_size) };
    }
    let old = ptr as usize;
    // SAFETY: as in `h_malloc`.
    let moved = unsafe {
        with_pool(ctx, |p| {
            let old_size = p.requested_size(old)?;
            let new = p.malloc_handle(new_size.max(1), 0).ok()?;
            // SAFETY: both are live, distinct host blocks of at least the sizes used.
            std::ptr::copy_nonoverlapping(old as *const u8, new as *mut u8, old_size.min(new_size));
            p.free_handle(old).ok()?;
            Some(new)
        })
    };
    moved.map_or(std::ptr::null_mut(), |a| a as *mut c_void)
}

unsafe extern "C" fn h_free(ctx: *mut c_void, ptr: *mut c_void, _size: usize) {
    if !ptr.is_null() {
        // SAFETY: as in `h_malloc`. A failure cannot be reported from here; the pool's
        // bookkeeping is unchanged by a refused free.
        unsafe { with_pool(ctx, |p| p.free_handle(ptr as usize).ok()) };
    }
}

unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: the capsule was made by `new_capsule` with this name and a boxed `Handler`
    // whose context is an `Arc::into_raw` pointer; both are released exactly once, here.
    unsafe {
        let ptr = ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr());
        if ptr.is_null() {
            ffi::PyErr_Clear();
            return;
        }
        let handler = Box::from_raw(ptr.cast::<Handler>());
        drop(Arc::from_raw(handler.allocator.ctx as *const Mutex<Pool>));
    }
}

/// A "mem_handler" capsule over `pool`. Fails on numpy older than 1.22.
pub fn new_capsule(py: Python<'_>, pool: &Arc<Mutex<Pool>>) -> PyResult<Py<PyAny>> {
    // SAFETY: reading numpy's C-API feature version has no preconditions beyond the API
    // being importable, which the call checks.
    let version = unsafe { npyffi::PY_ARRAY_API.PyArray_GetNDArrayCFeatureVersion(py) };
    if version < NPY_1_22_API_VERSION {
        return Err(pyo3::exceptions::PyImportError::new_err(
            "moecore.pool needs numpy >= 1.22 (per-array memory handlers)",
        ));
    }
    let mut name = [0 as c_char; 127];
    for (d, s) in name.iter_mut().zip(HANDLER_NAME.bytes()) {
        *d = s as c_char;
    }
    let handler = Box::new(Handler {
        name,
        version: 1,
        allocator: Allocator {
            ctx: Arc::into_raw(Arc::clone(pool)) as *mut c_void,
            malloc: h_malloc,
            calloc: h_calloc,
            realloc: h_realloc,
            free: h_free,
        },
    });
    let raw = Box::into_raw(handler);
    // SAFETY: `raw` is a valid heap pointer the capsule owns from now on (released by
    // `capsule_destructor`); the name is a static C string as the capsule API requires.
    unsafe {
        let cap = ffi::PyCapsule_New(
            raw.cast::<c_void>(),
            CAPSULE_NAME.as_ptr(),
            Some(capsule_destructor),
        );
        if cap.is_null() {
            let handler = Box::from_raw(raw);
            drop(Arc::from_raw(handler.allocator.ctx as *const Mutex<Pool>));
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, cap).unbind())
    }
}

/// Makes `array` own `data` through the handler `capsule`.
///
/// # Safety
/// `array` must be a freshly created numpy array (≥ 1.22) over `data` without `OWNDATA`,
/// and `data` a block allocated by `malloc_handle` in the pool behind `capsule`, owned by
/// nothing else.
pub unsafe fn adopt(array: &Bound<'_, PyAny>, capsule: &Py<PyAny>) {
    let fields = array.as_ptr().cast::<ArrayFields>();
    // SAFETY: by the contract `array` is a numpy ≥ 1.22 array, whose object layout starts
    // with `ArrayFields`; numpy leaves `mem_handler` null for arrays made over given data.
    unsafe {
        ffi::Py_INCREF(capsule.as_ptr());
        (*fields).mem_handler = capsule.as_ptr();
        (*fields).head.flags |= NPY_ARRAY_OWNDATA as c_int;
    }
}
