//! A C ABI for PyTorch's `torch.cuda.memory.CUDAPluggableAllocator`, so PyTorch users can put
//! moecore's pool under their trainer:
//!
//! ```python
//! import torch, moecore._core as core
//! alloc = torch.cuda.memory.CUDAPluggableAllocator(
//!     core.__file__, "moecore_cuda_malloc", "moecore_cuda_free")
//! torch.cuda.memory.change_current_allocator(alloc)
//! ```
//!
//! One pool per device, each over the external-arena backing ([`ArenasOnly`]): when no arena
//! has room, an arena of at least [`DEFAULT_ARENA_BYTES`] (or the request rounded up to
//! 2 MiB) is obtained with `cudaMalloc` and registered. The CUDA runtime is loaded with
//! `dlopen` on first use, so the extension neither links against CUDA nor needs it unless
//! this allocator is installed. The bookkeeping ([`Devices`]) is generic over where arenas
//! come from ([`ArenaSource`]) and is tested on the CPU with host arenas.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use super::{ArenasOnly, Pool, PoolError, RESERVED_STREAM, SEGMENT_ROUND};

/// The smallest arena obtained from the device at a time.
pub const DEFAULT_ARENA_BYTES: usize = 64 << 20;

/// Where arenas come from (`cudaMalloc` for the C ABI, host memory in tests).
pub trait ArenaSource: Send {
    /// `size` bytes on `device` (512-byte aligned at least), or `None`.
    fn obtain(&mut self, device: i32, size: usize) -> Option<usize>;
}

/// One pool per device, each growing by arenas from `source`.
pub struct Devices<S: ArenaSource> {
    source: S,
    arena_bytes: usize,
    pools: HashMap<i32, Pool>,
    /// Frees of pointers no pool handed out (ignored: PyTorch cannot handle an error there).
    pub foreign_frees: u64,
}

impl<S: ArenaSource> Devices<S> {
    /// Pools that obtain arenas of at least `arena_bytes` from `source`.
    pub fn new(source: S, arena_bytes: usize) -> Self {
        Self {
            source,
            arena_bytes: arena_bytes.max(SEGMENT_ROUND),
            pools: HashMap::new(),
            foreign_frees: 0,
        }
    }

    /// The pool of `device`, if it has been used.
    pub fn pool(&self, device: i32) -> Option<&Pool> {
        self.pools.get(&device)
    }

    /// A block of `size` bytes on `device` for `stream` (the raw `cudaStream_t`), growing the
    /// device's pool by one arena if needed; `None` when the device has no memory left.
    pub fn alloc(&mut self, size: usize, device: i32, stream: u64) -> Option<usize> {
        let stream = if stream == RESERVED_STREAM { 0 } else { stream };
        let pool = self
            .pools
            .entry(device)
            .or_insert_with(|| Pool::new(Box::new(ArenasOnly), None));
        match pool.malloc(size, stream) {
            Ok(address) => return Some(address),
            Err(PoolError::BackingExhausted { .. }) => {}
            Err(_) => return None,
        }
        let arena = size
            .checked_next_multiple_of(SEGMENT_ROUND)?
            .max(self.arena_bytes);
        let base = self.source.obtain(device, arena)?;
        pool.register_arena(base, arena).ok()?;
        pool.malloc(size, stream).ok()
    }

    /// Gives `address` back to `device`'s pool; an address it did not hand out is counted in
    /// [`Devices::foreign_frees`] and otherwise ignored.
    pub fn free(&mut self, address: usize, device: i32) {
        let freed = self.pools.get_mut(&device).map(|p| p.free(address).is_ok());
        if freed != Some(true) {
            self.foreign_frees += 1;
        }
    }
}

type CudaMalloc = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
type CudaSetDevice = unsafe extern "C" fn(c_int) -> c_int;
type CudaGetDevice = unsafe extern "C" fn(*mut c_int) -> c_int;

/// The three CUDA runtime entry points the allocator needs, found with `dlopen`/`dlsym`.
struct CudaRuntime {
    malloc: CudaMalloc,
    set_device: CudaSetDevice,
    get_device: CudaGetDevice,
}

impl CudaRuntime {
    const LIBRARIES: [&'static CStr; 4] = [
        c"libcudart.so",
        c"libcudart.so.13",
        c"libcudart.so.12",
        c"libcudart.so.11.0",
    ];

    fn load() -> Option<Self> {
        for name in Self::LIBRARIES {
            // SAFETY: `name` is a NUL-terminated string; dlopen has no other precondition.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if handle.is_null() {
                continue;
            }
            let sym = |s: &CStr| {
                // SAFETY: `handle` is a live handle from dlopen (never closed), `s` NUL-terminated.
                let p = unsafe { libc::dlsym(handle, s.as_ptr()) };
                (!p.is_null()).then_some(p)
            };
            let (Some(m), Some(s), Some(g)) = (
                sym(c"cudaMalloc"),
                sym(c"cudaSetDevice"),
                sym(c"cudaGetDevice"),
            ) else {
                continue;
            };
            // SAFETY: these CUDA runtime symbols have exactly these C signatures.
            return Some(unsafe {
                Self {
                    malloc: std::mem::transmute::<*mut c_void, CudaMalloc>(m),
                    set_device: std::mem::transmute::<*mut c_void, CudaSetDevice>(s),
                    get_device: std::mem::transmute::<*mut c_void, CudaGetDevice>(g),
                }
            });
        }
        None
    }
}

/// Arenas from `cudaMalloc` on the requested device (the caller's current device restored).
struct CudaArenas;

impl ArenaSource for CudaArenas {
    fn obtain(&mut self, device: i32, size: usize) -> Option<usize> {
        let rt = runtime()?;
        let mut previous: c_int = 0;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: the function pointers come from the CUDA runtime (see `CudaRuntime::load`);
        // the out-pointers point at live locals.
        let ok = unsafe {
            (rt.get_device)(&mut previous) == 0
                && (rt.set_device)(device) == 0
                && (rt.malloc)(&mut ptr, size) == 0
        };
        // SAFETY: as above; restoring the device the caller had.
        unsafe { (rt.set_device)(previous) };
        (ok && !ptr.is_null()).then_some(ptr as usize)
    }
}

fn runtime() -> Option<&'static CudaRuntime> {
    static RUNTIME: OnceLock<Option<CudaRuntime>> = OnceLock::new();
    RUNTIME.get_or_init(CudaRuntime::load).as_ref()
}

fn devices() -> &'static Mutex<Devices<CudaArenas>> {
    static DEVICES: OnceLock<Mutex<Devices<CudaArenas>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(Devices::new(CudaArenas, DEFAULT_ARENA_BYTES)))
}

/// `void* alloc(ssize_t size, int device, cudaStream_t stream)` for `CUDAPluggableAllocator`:
/// null when the size is not positive, no CUDA runtime loads, or the device is out of memory.
#[no_mangle]
pub extern "C" fn moecore_cuda_malloc(
    size: isize,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    let result = std::panic::catch_unwind(|| {
        let size = usize::try_from(size).ok().filter(|&s| s > 0)?;
        let mut d = devices().lock().ok()?;
        d.alloc(size, device, stream as usize as u64)
    });
    match result {
        Ok(Some(address)) => address as *mut c_void,
        _ => std::ptr::null_mut(),
    }
}

/// `void free(void* ptr, ssize_t size, int device, cudaStream_t stream)` for
/// `CUDAPluggableAllocator`: the block returns to the device's pool (for reuse on its stream).
#[no_mangle]
pub extern "C" fn moecore_cuda_free(
    ptr: *mut c_void,
    _size: isize,
    device: c_int,
    _stream: *mut c_void,
) {
    let _ = std::panic::catch_unwind(|| {
        if let Ok(mut d) = devices().lock() {
            d.free(ptr as usize, device);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Host memory arenas, kept alive for the test's duration.
    #[derive(Default)]
    struct HostArenas {
        buffers: Vec<(i32, Vec<u8>)>,
        budget: Option<usize>,
    }

    impl ArenaSource for HostArenas {
        fn obtain(&mut self, device: i32, size: usize) -> Option<usize> {
            if let Some(b) = self.budget {
                let used: usize = self.buffers.iter().map(|(_, v)| v.len()).sum();
                if used + size + 512 > b {
                    return None;
                }
            }
            let buf = vec![0u8; size + 512];
            let base = buf.as_ptr() as usize;
            self.buffers.push((device, buf));
            Some(base.next_multiple_of(512))
        }
    }

    #[test]
    fn grows_by_arenas_per_device_and_blocks_stay_inside() {
        let mut d = Devices::new(HostArenas::default(), 4 * MIB);
        let a = d.alloc(1000, 0, 7).unwrap();
        let b = d.alloc(3 * MIB, 0, 7).unwrap();
        let c = d.alloc(1000, 1, 7).unwrap();
        assert_eq!(
            d.source.buffers.len(),
            2,
            "one 4 MiB arena per device so far"
        );
        for (addr, dev) in [(a, 0), (b, 0), (c, 1)] {
            assert!(d.source.buffers.iter().any(|(bd, v)| *bd == dev
                && addr >= v.as_ptr() as usize
                && addr < v.as_ptr() as usize + v.len()));
        }
        let big = d.alloc(9 * MIB, 0, 7).unwrap(); // its own arena, rounded to 10 MiB
        assert!(big != 0);
        assert_eq!(
            d.source.buffers.last().map(|(_, v)| v.len()),
            Some(10 * MIB + 512)
        );
    }

    #[test]
    fn free_returns_the_block_for_reuse_on_its_stream() {
        let mut d = Devices::new(HostArenas::default(), 2 * MIB);
        let a = d.alloc(4096, 0, 1).unwrap();
        d.free(a, 0);
        assert_eq!(d.pool(0).unwrap().stats().allocated_bytes.all().current, 0);
        assert_ne!(
            d.alloc(4096, 0, 2).unwrap(),
            a,
            "another stream must not reuse it"
        );
        assert_eq!(d.alloc(4096, 0, 1).unwrap(), a, "its own stream reuses it");
    }

    #[test]
    fn out_of_device_memory_is_null_not_a_panic_and_foreign_frees_are_counted() {
        let mut d = Devices::new(
            HostArenas {
                budget: Some(3 * MIB),
                ..Default::default()
            },
            2 * MIB,
        );
        assert!(d.alloc(MIB, 0, 0).is_some());
        assert!(d.alloc(5 * MIB, 0, 0).is_none());
        d.free(12345, 0);
        d.free(12345, 3);
        assert_eq!(d.foreign_frees, 2);
    }

    #[test]
    fn c_abi_without_a_usable_device_returns_null_or_a_block_it_frees() {
        // No GPU here: either no CUDA runtime loads or cudaMalloc fails; on a GPU machine the
        // block comes back and is freed. Neither path may panic across the C boundary.
        assert!(moecore_cuda_malloc(0, 0, std::ptr::null_mut()).is_null());
        assert!(moecore_cuda_malloc(-5, 0, std::ptr::null_mut()).is_null());
        let p = moecore_cuda_malloc(4096, 0, std::ptr::null_mut());
        if !p.is_null() {
            moecore_cuda_free(p, 4096, 0, std::ptr::null_mut());
        }
        moecore_cuda_free(0x1000 as *mut c_void, 1, 0, std::ptr::null_mut());
    }
}
