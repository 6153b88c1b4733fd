//! The `dtype` argument of `PoolCore.empty`/`zeros`: converted to a descriptor and checked to
//! be plain numeric.
//!
//! Converting a dtype argument through numpy costs as much as the pool's whole allocation
//! for a small array, so the arguments people pass most (numpy's numeric scalar types,
//! Python's `bool`/`int`/`float`/`complex`, and their descriptors) are converted once and
//! found again by object identity in a small open-addressed table: one hash and usually one
//! comparison, where a linear scan of the same entries was 2–4 % of an `empty()` call.

use numpy::{PyArrayDescr, PyArrayDescrMethods};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyComplex, PyFloat, PyInt};

use super::errors::PoolMisuse;

/// The dtype, which must be a plain numeric one: bool, integers, floats, complex, or a
/// registered numeric scalar type such as ml_dtypes' bfloat16 (numpy kind 'V' but no fields).
/// `None` means float64, as in numpy.
pub(super) fn numeric_dtype<'py>(
    py: Python<'py>,
    dtype: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArrayDescr>> {
    let Some(d) = dtype else {
        return Ok(numpy::dtype::<f64>(py));
    };
    match common_dtypes(py).get(d) {
        Some(descr) => Ok(descr.bind(py).clone()),
        None => checked_dtype(py, d),
    }
}

/// Slots in the table: a power of two, more than twice the ~36 entries it holds, so probe
/// sequences stay short.
const SLOTS: usize = 128;

/// Dtype arguments and their checked descriptors, keyed by the argument's address.
struct DtypeTable {
    slots: Vec<Option<(usize, Py<PyArrayDescr>)>>,
    /// Strong references to every key, so that no address in `slots` can be freed and reused
    /// by another object while the table lives (it lives as long as the module).
    keys_alive: Vec<Py<PyAny>>,
}

impl DtypeTable {
    fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| None).collect(),
            keys_alive: Vec::new(),
        }
    }

    fn home(address: usize) -> usize {
        // Fibonacci hashing: the top bits of the product mix every bit of the address
        // (objects are 16-byte aligned, so the low bits alone would collide).
        ((address as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOTS.trailing_zeros()))
            as usize
    }

    /// The descriptor stored for exactly this object, if any.
    fn get(&self, arg: &Bound<'_, PyAny>) -> Option<&Py<PyArrayDescr>> {
        let address = arg.as_ptr() as usize;
        let mut i = Self::home(address);
        // The table is never full (see `insert`), so an empty slot ends every probe.
        loop {
            match &self.slots[i] {
                None => return None,
                Some((key, descr)) if *key == address => return Some(descr),
                Some(_) => i = (i + 1) % SLOTS,
            }
        }
    }

    fn insert(&mut self, arg: Bound<'_, PyAny>, descr: &Bound<'_, PyArrayDescr>) {
        if self.get(&arg).is_some() || self.keys_alive.len() + 1 >= SLOTS {
            return;
        }
        let address = arg.as_ptr() as usize;
        let mut i = Self::home(address);
        while self.slots[i].is_some() {
            i = (i + 1) % SLOTS;
        }
        self.slots[i] = Some((address, descr.clone().unbind()));
        self.keys_alive.push(arg.unbind());
    }
}

/// The table of common dtype arguments, built on first use.
fn common_dtypes(py: Python<'_>) -> &DtypeTable {
    static COMMON: PyOnceLock<DtypeTable> = PyOnceLock::new();
    COMMON.get_or_init(py, || {
        let mut args: Vec<Bound<'_, PyAny>> = vec![
            py.get_type::<PyBool>().into_any(),
            py.get_type::<PyInt>().into_any(),
            py.get_type::<PyFloat>().into_any(),
            py.get_type::<PyComplex>().into_any(),
        ];
        if let Ok(np) = py.import("numpy") {
            for name in [
                "bool_",
                "int8",
                "int16",
                "int32",
                "int64",
                "uint8",
                "uint16",
                "uint32",
                "uint64",
                "float16",
                "float32",
                "float64",
                "complex64",
                "complex128",
            ] {
                if let Ok(t) = np.getattr(name) {
                    args.push(t);
                }
            }
        }
        let mut table = DtypeTable::new();
        for a in args {
            if let Ok(d) = checked_dtype(py, &a) {
                // numpy's builtin descriptors are singletons: `np.dtype(np.float32)` is
                // always the same object, so it can be looked up by identity too.
                table.insert(d.clone().into_any(), &d);
                table.insert(a, &d);
            }
        }
        table
    })
}

/// Converts a dtype argument (not None) and checks that it is plain numeric.
fn checked_dtype<'py>(
    py: Python<'py>,
    dtype: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDescr>> {
    let descr = match dtype.cast::<PyArrayDescr>() {
        Ok(d) => d.clone(),
        Err(_) => PyArrayDescr::new(py, dtype)?,
    };
    let kind = descr.kind();
    let numeric = match kind {
        b'b' | b'i' | b'u' | b'f' | b'c' => true,
        b'V' => {
            let void = PyArrayDescr::new(py, "V1")?.typeobj();
            !descr.has_fields() && !descr.has_subarray() && !descr.typeobj().is(&void)
        }
        _ => false,
    };
    if !numeric || descr.has_object() || descr.itemsize() == 0 {
        return Err(PoolMisuse::new_err(format!(
            "dtype must be a plain numeric type (bool, integer, float, complex), got {} \
             (kind '{}')",
            descr.str().map(|s| s.to_string()).unwrap_or_default(),
            char::from(kind)
        )));
    }
    Ok(descr)
}
