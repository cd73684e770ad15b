//! Device selection that sees CUDA from any binary linking this crate.
//!
//! libtorch's CUDA backend lives in `libtorch_cuda.so`. A Rust binary references none of its
//! symbols, so the linker's `--as-needed` drops it and `tch::Cuda::is_available()` answers
//! `false` even on a GPU machine. This crate's own targets keep it linked (see `build.rs`);
//! a downstream binary has no such link flag, so [`load_cuda_backend`] opens the library at
//! run time with `RTLD_GLOBAL`, which registers the CUDA backend with libtorch. It must run
//! before the first CUDA query, because libtorch caches that answer: every function here
//! calls it first, so use these instead of `tch::Cuda` / `tch::Device::cuda_if_available`.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::sync::OnceLock;

use tch::{Cuda, Device};

/// Loads `libtorch_cuda.so` once (a no-op with a CPU-only libtorch, where it is absent).
/// Returns whether the library is loaded.
///
/// The library is looked up by name (the binary's run path, `LD_LIBRARY_PATH`, the system
/// cache), then beside the `libtorch_cpu.so` this process already mapped, which finds it
/// however libtorch itself was found.
pub fn load_cuda_backend() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        dlopen_global(c"libtorch_cuda.so")
            || sibling_of_loaded_libtorch("libtorch_cuda.so")
                .is_some_and(|path| dlopen_global(&path))
    })
}

fn dlopen_global(library: &CStr) -> bool {
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is deliberately never
    // closed, the backend must stay registered for the life of the process.
    let handle = unsafe { libc::dlopen(library.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

/// `<folder of the mapped libtorch_cpu.so>/<name>`, read from `/proc/self/maps`.
fn sibling_of_loaded_libtorch(name: &str) -> Option<CString> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let cpu_library = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))?;
    let sibling = Path::new(cpu_library).parent()?.join(name);
    CString::new(sibling.into_os_string().into_encoded_bytes()).ok()
}

/// Whether a CUDA device can be used.
pub fn cuda_is_available() -> bool {
    load_cuda_backend();
    Cuda::is_available()
}

/// Number of visible CUDA devices (0 without CUDA).
pub fn cuda_device_count() -> usize {
    load_cuda_backend();
    if Cuda::is_available() {
        Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// `Device::Cuda(0)` when CUDA is usable, else `Device::Cpu`.
pub fn cuda_if_available() -> Device {
    if cuda_is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}
