//! Makes the crate's own binaries, tests, examples and benches find and load libtorch, and
//! compiles the few libtorch operations tch does not bind (`csrc/refa_ops.cpp`).
//!
//! Three jobs, each verified on this project's machines:
//! 1. torch-sys links against libtorch but records no run-time search path, so every
//!    executable would need `LD_LIBRARY_PATH`. We add an rpath to the libtorch folder.
//! 2. The linker's `--as-needed` drops `libtorch_cuda.so` because no symbol of it is
//!    referenced; CUDA then looks absent even on a GPU. We force it to stay linked.
//! 3. `csrc/refa_ops.cpp` (fused AdamW, multi-tensor gradient norms, allocator statistics) is
//!    compiled with the `cc` crate against the same libtorch headers torch-sys uses, with
//!    the C++ ABI torch-sys found (`LIBTORCH_CXX11_ABI`, default 1 as in the torch wheels).
//!
//! `cargo:rustc-link-arg` only reaches this package's own targets. Downstream binaries get
//! CUDA through `refa_loss::device`, which loads `libtorch_cuda.so` at run time instead.
//! Documentation builds (feature `doc-only`, as on docs.rs) have no libtorch and skip all of it.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/refa_ops.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    if env::var_os("CARGO_FEATURE_DOC_ONLY").is_some() {
        return;
    }
    // Set by torch-sys through its `links = "tch"` key.
    let Some(lib_dir) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        panic!("torch-sys did not report its libtorch folder (DEP_TCH_LIBTORCH_LIB); build through scripts/cargo or set LIBTORCH");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    compile_ops(&lib_dir);
}

fn compile_ops(lib_dir: &std::path::Path) {
    let include = lib_dir
        .parent()
        .map(|root| root.join("include"))
        .filter(|dir| dir.join("ATen/ATen.h").exists())
        .unwrap_or_else(|| panic!("no libtorch headers next to {}", lib_dir.display()));
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .file("csrc/refa_ops.cpp")
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        // libtorch's headers trigger these by the hundred; they say nothing about our code.
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(true)
        .compile("refa_ops");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    for lib in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
