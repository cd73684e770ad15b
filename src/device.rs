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

use tch::{Cuda, Device, Tensor};

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

/// The weight kind a device trains in by default: bf16 on a GPU (with f32 master weights in
/// the optimizer), f32 on the CPU (where bf16 matmuls are slow).
pub fn default_kind(device: Device) -> tch::Kind {
    if device.is_cuda() {
        tch::Kind::BFloat16
    } else {
        tch::Kind::Float
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

/// What the accelerator's caching allocator holds, in bytes (`torch.cuda.memory_stats`'s
/// `allocated_bytes.all.*` and `reserved_bytes.all.*`, plus the device's free and total
/// memory as the driver reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in live tensors now.
    pub allocated: u64,
    /// Most bytes in live tensors since the start or the last [`reset_peak_memory`].
    pub peak_allocated: u64,
    /// Bytes the allocator holds from the driver now (allocated plus cached).
    pub reserved: u64,
    /// Most bytes held since the start or the last reset.
    pub peak_reserved: u64,
    /// Free device memory (the driver's count; other processes' use included).
    pub free: u64,
    /// The device's memory.
    pub total: u64,
}

/// The CUDA caching allocator's statistics for `device` (tch has no binding for them;
/// `csrc/refa_ops.cpp` reads them through libtorch's accelerator API). `None` for the CPU
/// or when no accelerator is present.
pub fn memory_stats(device: Device) -> crate::Result<Option<MemoryStats>> {
    let Device::Cuda(index) = device else {
        return Ok(None);
    };
    if !cuda_is_available() {
        return Ok(None);
    }
    let bytes = |v: i64| v.max(0) as u64;
    Ok(crate::ffi::memory_stats(index)?.map(|s| MemoryStats {
        allocated: bytes(s[0]),
        peak_allocated: bytes(s[1]),
        reserved: bytes(s[2]),
        peak_reserved: bytes(s[3]),
        free: bytes(s[4]),
        total: bytes(s[5]),
    }))
}

/// Starts the peak counts of [`memory_stats`] anew (a no-op for the CPU).
pub fn reset_peak_memory(device: Device) -> crate::Result<()> {
    match device {
        Device::Cuda(index) if cuda_is_available() => crate::ffi::reset_peak_memory(index),
        _ => Ok(()),
    }
}

/// Copies a host tensor to `device` without making the host wait: for CUDA the tensor is
/// first put in page-locked memory, so the copy is asynchronous (a copy from pageable memory
/// would stage through a driver buffer and block). A no-op for the CPU.
pub(crate) fn upload(host: &Tensor, device: Device) -> Tensor {
    if device == Device::Cpu || host.device() == device {
        return host.shallow_clone();
    }
    // tch's pin_memory passes a device argument libtorch 2.11 warns about at every call.
    match crate::ffi::pin_memory(host) {
        Ok(pinned) => pinned.to_device_(device, host.kind(), true, false),
        Err(_) => host.to_device_(device, host.kind(), false, false),
    }
}
