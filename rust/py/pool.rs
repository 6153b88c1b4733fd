//! Bindings of the memory pool: `PoolCore` (a pool behind a mutex), `pool_replay` and
//! `pool_random_trace`.
//!
//! Arrays made by `PoolCore.empty`/`zeros` are ordinary numpy arrays that own their data
//! through a numpy memory handler backed by the pool (see [`pool_handler`](super::pool_handler)):
//! views keep them alive, and their death returns the block to the pool, on any thread. The
//! pool sits behind `Arc<Mutex<..>>` and the handler holds an `Arc` to it, so the pool
//! outlives its arrays.

use std::ffi::c_int;
use std::sync::{Arc, Mutex, MutexGuard};

use numpy::npyffi::{self, npy_intp, NPY_ARRAY_CARRAY, PY_ARRAY_API};
use numpy::{PyArrayDescr, PyArrayDescrMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyList, PySequence, PyString, PyTuple};

use super::errors::{InternalError, PoolMisuse, PoolOutOfMemory};
use super::gil;
use super::pool_dtype::numeric_dtype;
use super::pool_handler;
use crate::pool::{
    random_trace, replay, ArenasOnly, BlockState, Pool, PoolError, ReplayReport, TraceEvent,
};

impl From<PoolError> for PyErr {
    fn from(e: PoolError) -> PyErr {
        let msg = e.to_string();
        match e {
            PoolError::LimitExceeded { .. }
            | PoolError::BackingExhausted { .. }
            | PoolError::SizeOverflow { .. } => PoolOutOfMemory::new_err(msg),
            PoolError::TraceUnknownId { .. } | PoolError::TraceDuplicateId { .. } => {
                PyValueError::new_err(msg)
            }
            PoolError::TraceEventFailed { source, .. } => match *source {
                PoolError::LimitExceeded { .. } | PoolError::BackingExhausted { .. } => {
                    PoolOutOfMemory::new_err(msg)
                }
                _ => PyValueError::new_err(msg),
            },
            PoolError::ZeroSize
            | PoolError::AlignmentNotPowerOfTwo { .. }
            | PoolError::AlignmentTooLarge { .. }
            | PoolError::ReservedStream { .. }
            | PoolError::ForeignAddress { .. }
            | PoolError::NotBlockStart { .. }
            | PoolError::DoubleFree { .. }
            | PoolError::OwnedByArray { .. }
            | PoolError::ArenaTooSmall { .. }
            | PoolError::ArenaOverlap { .. }
            | PoolError::UnknownArena { .. }
            | PoolError::ArenaInUse { .. } => PoolMisuse::new_err(msg),
        }
    }
}

type Shared = Arc<Mutex<Pool>>;

fn lock(pool: &Shared) -> PyResult<MutexGuard<'_, Pool>> {
    pool.lock()
        .map_err(|_| InternalError::new_err("the pool was poisoned by an earlier internal error"))
}

/// A positive byte count from a Python int (negative and zero are misuse, not overflow).
fn byte_count(what: &str, n: i128) -> PyResult<usize> {
    if n <= 0 {
        return Err(PoolMisuse::new_err(format!(
            "{what} must be positive, got {n}"
        )));
    }
    usize::try_from(n)
        .map_err(|_| PoolOutOfMemory::new_err(format!("{what} {n} is too large to allocate")))
}

fn stream_id(stream: i128) -> PyResult<u64> {
    u64::try_from(stream)
        .ok()
        .filter(|&s| s != crate::pool::RESERVED_STREAM)
        .ok_or_else(|| {
            PoolMisuse::new_err(format!(
                "stream must be an integer in [0, 2**64 - 2], got {stream}"
            ))
        })
}

/// An address from a Python int; a negative or oversized one is foreign to every pool.
fn address(addr: i128) -> PyResult<usize> {
    usize::try_from(addr)
        .map_err(|_| PoolMisuse::new_err(format!("address {addr} was not allocated by this pool")))
}

/// The pool behind `moecore.pool.HostPool` and `moecore.pool.ArenaPool`.
#[pyclass(module = "moecore._core", subclass, frozen)]
pub struct PoolCore {
    pool: Shared,
    host: bool,
    /// The numpy memory-handler capsule through which arrays give blocks back.
    handler: Py<PyAny>,
}

/// The most dimensions an array may have (numpy 2's `NPY_MAXDIMS`; numpy 1 refuses more
/// than 32 itself, with its own error).
const MAX_DIMS: usize = 64;

/// Dimensions held inline; more spill to the heap. Arrays in hot loops have few
/// dimensions, and a 64-entry buffer per call was a 512-byte memset and move in the profile
/// of `empty()` for small arrays.
const INLINE_DIMS: usize = 8;

/// The dimensions of a new array: on the stack up to `INLINE_DIMS`, else in `spill`.
struct Dims {
    len: usize,
    inline: [npy_intp; INLINE_DIMS],
    spill: Vec<npy_intp>,
}

impl Dims {
    fn new() -> Self {
        Dims {
            len: 0,
            inline: [0; INLINE_DIMS],
            spill: Vec::new(),
        }
    }

    fn push(&mut self, d: i64, shape: &Bound<'_, PyAny>) -> PyResult<()> {
        if d < 0 {
            return Err(PoolMisuse::new_err(format!(
                "negative dimensions are not allowed, got shape {}",
                shape.repr().map(|r| r.to_string()).unwrap_or_default()
            )));
        }
        if self.len == MAX_DIMS {
            return Err(PoolMisuse::new_err(format!(
                "too many dimensions: at most {MAX_DIMS} are supported"
            )));
        }
        if self.len < INLINE_DIMS {
            self.inline[self.len] = d as npy_intp;
        } else {
            if self.len == INLINE_DIMS {
                self.spill.extend_from_slice(&self.inline);
            }
            self.spill.push(d as npy_intp);
        }
        self.len += 1;
        Ok(())
    }

    fn as_mut_slice(&mut self) -> &mut [npy_intp] {
        if self.len <= INLINE_DIMS {
            &mut self.inline[..self.len]
        } else {
            &mut self.spill
        }
    }
}

/// Reads the dimensions of `shape` (an int or a sequence of ints, all non-negative) into
/// `dims`, which is filled in place rather than returned so that it is never moved.
fn parse_shape(shape: &Bound<'_, PyAny>, dims: &mut Dims) -> PyResult<()> {
    // Fast paths first, checked by type so that no exception is raised and dropped on the
    // way: a plain int, or a tuple of plain ints.
    if let Ok(n) = shape.cast_exact::<PyInt>() {
        if let Ok(n) = n.extract::<i64>() {
            return dims.push(n, shape);
        }
    }
    let int_item = |item: &Bound<'_, PyAny>| {
        item.extract::<i64>().map_err(|_| {
            PoolMisuse::new_err(format!(
                "shape must contain ints, got {} in {}",
                type_name(item),
                shape.repr().map(|r| r.to_string()).unwrap_or_default()
            ))
        })
    };
    if let Ok(t) = shape.cast_exact::<PyTuple>() {
        for item in t.iter() {
            dims.push(int_item(&item)?, shape)?;
        }
        return Ok(());
    }
    if let Ok(n) = shape.extract::<i64>() {
        return dims.push(n, shape);
    }
    let seq = shape.cast::<PySequence>().map_err(|_| {
        PoolMisuse::new_err(format!(
            "shape must be an int or a sequence of ints, got {}",
            type_name(shape)
        ))
    })?;
    for item in seq.try_iter()? {
        dims.push(int_item(&item?)?, shape)?;
    }
    Ok(())
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

impl PoolCore {
    /// An array of `shape` and `dtype` over a fresh pool block (uninitialised, or zeroed).
    fn new_array<'py>(
        &self,
        py: Python<'py>,
        shape: &Bound<'py, PyAny>,
        dtype: Option<&Bound<'py, PyAny>>,
        zero: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        if !self.host {
            return Err(PoolMisuse::new_err(
                "empty()/zeros() need a host pool; this pool serves registered arenas only",
            ));
        }
        let mut dims = Dims::new();
        parse_shape(shape, &mut dims)?;
        let descr = numeric_dtype(py, dtype)?;
        let nbytes = dims
            .as_mut_slice()
            .iter()
            .try_fold(descr.itemsize(), |acc, &d| acc.checked_mul(d as usize))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(|| {
                PoolOutOfMemory::new_err(format!(
                    "an array of shape {} and dtype {} is too large",
                    shape.repr().map(|r| r.to_string()).unwrap_or_default(),
                    descr.str().map(|s| s.to_string()).unwrap_or_default()
                ))
            })?;
        let nd = dims.len as c_int; // at most MAX_DIMS
        if nbytes == 0 {
            // Nothing to allocate: numpy makes its own empty array.
            // SAFETY: as below, with null data (numpy allocates).
            return unsafe {
                new_ndarray(py, descr, dims.as_mut_slice(), nd, std::ptr::null_mut(), 0)
            };
        }
        let addr = gil::guarded("pool.empty", || {
            lock(&self.pool)?
                .malloc_handle(nbytes, 0)
                .map_err(PyErr::from)
        })??;
        let give_back = |e: PyErr| {
            if let Ok(mut p) = self.pool.lock() {
                let _ = p.free_handle(addr);
            }
            e
        };
        if zero {
            let fill = move || {
                // SAFETY: `addr` is a live host block of at least `nbytes` bytes that nothing
                // else can see yet.
                unsafe { std::ptr::write_bytes(addr as *mut u8, 0, nbytes) }
            };
            let filled = if nbytes >= 1 << 20 {
                gil::detached(py, "pool.zeros", fill)
            } else {
                gil::guarded("pool.zeros", fill)
            };
            filled.map_err(give_back)?;
        }
        // SAFETY: `addr` is a live block of `nbytes` bytes (512 B aligned), just allocated
        // with `malloc_handle` from the pool behind `self.handler`; the new array is handed
        // to `adopt` right away and nothing else owns the block.
        unsafe {
            let arr = new_ndarray(
                py,
                descr,
                dims.as_mut_slice(),
                nd,
                addr as *mut std::ffi::c_void,
                NPY_ARRAY_CARRAY,
            )
            .map_err(give_back)?;
            pool_handler::adopt(&arr, &self.handler);
            Ok(arr)
        }
    }
}

/// A C-ordered array of `descr` over `data` (or over memory numpy allocates if null).
///
/// # Safety
/// `dims` has at least `nd` entries; `data` is null or points to enough memory for the array, valid
/// for as long as the caller arranges (see `pool_handler::adopt`).
unsafe fn new_ndarray<'py>(
    py: Python<'py>,
    descr: Bound<'py, PyArrayDescr>,
    dims: &mut [npy_intp],
    nd: c_int,
    data: *mut std::ffi::c_void,
    flags: c_int,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: `into_dtype_ptr` hands over a reference to a valid dtype, which the call
    // steals; the other arguments are valid by this function's contract; null strides mean
    // C order; a null `obj` means no subtype initialisation.
    unsafe {
        let arr = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type),
            descr.into_dtype_ptr(),
            nd,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data,
            flags,
            std::ptr::null_mut(),
        );
        Bound::from_owned_ptr_or_err(py, arr)
    }
}

#[pymethods]
impl PoolCore {
    /// A pool over `backing` ("host": host memory in 2 MiB-aligned segments; "arenas":
    /// only memory registered with `register_arena`), with an optional limit on reserved
    /// bytes.
    #[new]
    #[pyo3(signature = (backing = "host", limit_bytes = None))]
    fn new(py: Python<'_>, backing: &str, limit_bytes: Option<i128>) -> PyResult<Self> {
        let limit = match limit_bytes {
            None => None,
            Some(n) if n > 0 => Some(u64::try_from(n).unwrap_or(u64::MAX)),
            Some(n) => {
                return Err(PoolMisuse::new_err(format!(
                    "limit_bytes must be positive or None, got {n}"
                )))
            }
        };
        let (pool, host) = match backing {
            "host" => (Pool::host(limit), true),
            "arenas" => (Pool::new(Box::new(ArenasOnly), limit), false),
            other => {
                return Err(PoolMisuse::new_err(format!(
                    "backing must be 'host' or 'arenas', got {other:?}"
                )))
            }
        };
        let pool = Arc::new(Mutex::new(pool));
        let handler = pool_handler::new_capsule(py, &pool)?;
        Ok(Self {
            pool,
            host,
            handler,
        })
    }

    /// The limit on reserved bytes, or None.
    #[getter]
    fn limit_bytes(&self) -> PyResult<Option<u64>> {
        Ok(lock(&self.pool)?.limit())
    }

    /// The backing: "host" or "arenas".
    #[getter]
    fn backing(&self) -> &'static str {
        if self.host {
            "host"
        } else {
            "arenas"
        }
    }

    /// An uninitialised C-contiguous array of `shape` and `dtype` (default float64) whose
    /// memory returns to the pool when the array and all its views are gone.
    #[pyo3(signature = (shape, dtype = None))]
    fn empty<'py>(
        slf: &Bound<'py, Self>,
        shape: &Bound<'py, PyAny>,
        dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().new_array(slf.py(), shape, dtype, false)
    }

    /// Like `empty`, filled with zeros.
    #[pyo3(signature = (shape, dtype = None))]
    fn zeros<'py>(
        slf: &Bound<'py, Self>,
        shape: &Bound<'py, PyAny>,
        dtype: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().new_array(slf.py(), shape, dtype, true)
    }

    /// Allocates `nbytes` for use on `stream`; returns the address (an int). `alignment`
    /// must be a power of two no larger than 512.
    #[pyo3(signature = (nbytes, stream = 0, alignment = 512))]
    fn malloc(&self, nbytes: i128, stream: i128, alignment: i128) -> PyResult<usize> {
        let n = byte_count("nbytes", nbytes)?;
        let s = stream_id(stream)?;
        let a = usize::try_from(alignment).unwrap_or(0);
        if a == 0 || !a.is_power_of_two() {
            return Err(PoolMisuse::new_err(format!(
                "alignment must be a power of two, got {alignment}"
            )));
        }
        gil::guarded("pool.malloc", || {
            lock(&self.pool)?
                .malloc_aligned(n, a, s)
                .map_err(PyErr::from)
        })?
    }

    /// Frees the block at `address` (from `malloc`). A double free, an address this pool did
    /// not hand out, or the memory of a live array raise `PoolMisuse`.
    fn free(&self, address: i128) -> PyResult<()> {
        let a = self::address(address)?;
        gil::guarded("pool.free", || {
            lock(&self.pool)?.free(a).map_err(PyErr::from)
        })?
    }

    /// Records that `stream` also uses the allocated block at `address`: once freed, the
    /// block is not reused until `synchronize()`.
    fn record_stream(&self, address: i128, stream: i128) -> PyResult<()> {
        let a = self::address(address)?;
        let s = stream_id(stream)?;
        gil::guarded("pool.record_stream", || {
            lock(&self.pool)?.record_stream(a, s).map_err(PyErr::from)
        })?
    }

    /// Declares the work of every stream finished: freed blocks become reusable by any
    /// stream, pending blocks are released.
    fn synchronize(&self) -> PyResult<()> {
        gil::guarded("pool.synchronize", || {
            lock(&self.pool).map(|mut p| p.synchronize())
        })?
    }

    /// Gives wholly free segments back to the backing; returns the bytes released.
    fn empty_cache(&self) -> PyResult<usize> {
        gil::guarded("pool.empty_cache", || {
            lock(&self.pool).map(|mut p| p.empty_cache())
        })?
    }

    /// Sets every peak statistic to its current value.
    fn reset_peak_stats(&self) -> PyResult<()> {
        gil::guarded("pool.reset_peak_stats", || {
            lock(&self.pool).map(|mut p| p.reset_peak_stats())
        })?
    }

    /// The statistics under `torch.cuda.memory_stats()` keys (e.g.
    /// "allocated_bytes.all.current").
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let flat = gil::guarded("pool.stats", || {
            lock(&self.pool).map(|p| p.stats().to_flat())
        })??;
        let d = PyDict::new(py);
        for (k, v) in flat {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Every segment (address, size, kind, blocks) with its blocks (offset, size,
    /// requested, state, allocated, stream, cached), as plain dicts in address order.
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let snap = gil::guarded("pool.snapshot", || lock(&self.pool).map(|p| p.snapshot()))??;
        let out = PyList::empty(py);
        for seg in snap {
            let blocks = PyList::empty(py);
            for b in seg.blocks {
                let d = PyDict::new(py);
                d.set_item("offset", b.offset)?;
                d.set_item("size", b.size)?;
                d.set_item("requested", b.requested)?;
                d.set_item("state", b.state.name())?;
                d.set_item("allocated", b.state == BlockState::Allocated)?;
                d.set_item("stream", b.stream)?;
                d.set_item("cached", b.cached)?;
                blocks.append(d)?;
            }
            let d = PyDict::new(py);
            d.set_item("address", seg.address)?;
            d.set_item("size", seg.size)?;
            d.set_item("kind", seg.kind.name())?;
            d.set_item("blocks", blocks)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Registers the external arena `[base, base + size)`: the pool carves blocks from it
    /// and never frees it. It must stay valid until `unregister_arena(base)`.
    fn register_arena(&self, base: i128, size: i128) -> PyResult<()> {
        let n = byte_count("size", size)?;
        let b = usize::try_from(base)
            .ok()
            .filter(|&b| b != 0)
            .ok_or_else(|| {
                PoolMisuse::new_err(format!("base must be a valid address, got {base}"))
            })?;
        gil::guarded("pool.register_arena", || {
            lock(&self.pool)?.register_arena(b, n).map_err(PyErr::from)
        })?
    }

    /// Forgets the arena registered at `base` (it must have no live block).
    fn unregister_arena(&self, base: i128) -> PyResult<()> {
        let b = self::address(base)?;
        gil::guarded("pool.unregister_arena", || {
            lock(&self.pool)?.unregister_arena(b).map_err(PyErr::from)
        })?
    }
}

/// One trace event from a tuple: ("alloc", id, size[, stream]) or ("free", id).
fn parse_event(index: usize, ev: &Bound<'_, PyAny>) -> PyResult<TraceEvent> {
    let bad = || {
        PyValueError::new_err(format!(
            "trace event {index}: expected ('alloc', id, size, stream) or ('free', id) with \
             non-negative ints and a positive size, got {}",
            ev.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    };
    if ev.is_instance_of::<PyString>() {
        return Err(bad());
    }
    let t = ev.cast::<PySequence>().map_err(|_| bad())?;
    let len = t.len().map_err(|_| bad())?;
    let op = t.get_item(0).map_err(|_| bad())?;
    let op = op
        .cast::<PyString>()
        .map_err(|_| bad())?
        .to_cow()?
        .into_owned();
    let int = |i: usize| -> PyResult<u64> {
        t.get_item(i)
            .and_then(|v| v.extract::<u64>())
            .map_err(|_| bad())
    };
    match (op.as_str(), len) {
        ("alloc", 3 | 4) => {
            let size = usize::try_from(int(2)?).map_err(|_| bad())?;
            let stream = if len == 4 { int(3)? } else { 0 };
            if size == 0 || stream == crate::pool::RESERVED_STREAM {
                return Err(bad());
            }
            Ok(TraceEvent::Alloc {
                id: int(1)?,
                size,
                stream,
            })
        }
        ("free", 2) => Ok(TraceEvent::Free { id: int(1)? }),
        _ => Err(bad()),
    }
}

fn report_dict<'py>(py: Python<'py>, r: &ReplayReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("allocs", r.allocs)?;
    d.set_item("frees", r.frees)?;
    d.set_item("peak_allocated", r.peak_allocated)?;
    d.set_item("peak_requested", r.peak_requested)?;
    d.set_item("peak_reserved", r.peak_reserved)?;
    d.set_item("fragmentation", r.fragmentation)?;
    d.set_item("final_allocated", r.final_allocated)?;
    d.set_item("segments_obtained", r.segments_obtained)?;
    Ok(d)
}

/// Replays a trace of ("alloc", id, size, stream) / ("free", id) tuples on a fresh pool over
/// a simulated address space; returns peaks and fragmentation as a dict.
#[pyfunction]
pub fn pool_replay<'py>(
    py: Python<'py>,
    trace: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut events = Vec::new();
    for (i, ev) in trace.try_iter()?.enumerate() {
        events.push(parse_event(i, &ev?)?);
    }
    let report = gil::detached(py, "pool.replay", || replay(&events))??;
    report_dict(py, &report)
}

/// RMM's random-allocation workload as a list of trace tuples (see `moecore.pool`).
#[pyfunction]
#[pyo3(signature = (n_allocations, min_size = 1024, max_size = 67_108_864, max_live_bytes = 16_777_216_000, seed = 0))]
pub fn pool_random_trace<'py>(
    py: Python<'py>,
    n_allocations: usize,
    min_size: usize,
    max_size: usize,
    max_live_bytes: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyList>> {
    if min_size == 0 || max_size < min_size {
        return Err(PyValueError::new_err(format!(
            "need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}"
        )));
    }
    let events = gil::detached(py, "pool.random_trace", || {
        random_trace(n_allocations, min_size, max_size, max_live_bytes, seed)
    })?;
    let out = PyList::empty(py);
    for ev in events {
        match ev {
            TraceEvent::Alloc { id, size, stream } => {
                out.append(("alloc", id, size, stream))?;
            }
            TraceEvent::Free { id } => out.append(("free", id))?,
        }
    }
    Ok(out)
}
