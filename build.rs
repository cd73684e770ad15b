//! Makes the crate's own binaries, tests, examples and benches find and load libtorch.
//!
//! Two problems are solved here, both verified on this project's machines:
//! 1. torch-sys links against libtorch but records no run-time search path, so every
//!    executable would need `LD_LIBRARY_PATH`. We add an rpath to the libtorch folder.
//! 2. The linker's `--as-needed` drops `libtorch_cuda.so` because no symbol of it is
//!    referenced; CUDA then looks absent even on a GPU. We force it to stay linked.
//!
//! `cargo:rustc-link-arg` only reaches this package's own targets. Downstream binaries get
//! CUDA through `refa_loss::device`, which loads `libtorch_cuda.so` at run time instead.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Set by torch-sys through its `links = "tch"` key.
    let Some(lib_dir) = env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!("cargo:warning=torch-sys did not report its libtorch folder; add it to the library path at run time");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
