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
//!
//! With the feature `distributed`, `csrc/refa_dist.cpp` (c10d process groups) is compiled
//! too: its Gloo part needs the gloo headers, which the torch wheel lacks (Debian/Ubuntu:
//! `libgloo-dev`; `scripts/cargo` installs it); its NCCL part is compiled when the wheel's
//! NCCL headers and the CUDA headers it includes are present (`scripts/cargo` installs the two
//! header-only wheels `nvidia-cuda-crt` and `nvidia-cuda-cccl`), unless `REFA_NCCL=0`.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/refa_ops.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/refa_dist.cpp");
    println!("cargo:rerun-if-changed=csrc/refa_guard.h");
    println!("cargo:rerun-if-env-changed=REFA_NCCL");
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
    if env::var_os("CARGO_FEATURE_DISTRIBUTED").is_some() {
        compile_distributed(&lib_dir);
    }
}

/// The C++ compiler set up for libtorch's headers (`include` is `<torch>/include`).
fn libtorch_cpp(include: &std::path::Path) -> cc::Build {
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include(include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        // libtorch's headers trigger these by the hundred; they say nothing about our code.
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-interference-size")
        .warnings(true);
    build
}

fn torch_include(lib_dir: &std::path::Path) -> PathBuf {
    lib_dir
        .parent()
        .map(|root| root.join("include"))
        .filter(|dir| dir.join("ATen/ATen.h").exists())
        .unwrap_or_else(|| panic!("no libtorch headers next to {}", lib_dir.display()))
}

fn compile_distributed(lib_dir: &std::path::Path) {
    let include = torch_include(lib_dir);
    let gloo = ["/usr/include", "/usr/local/include"]
        .iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("gloo/config.h").exists())
        .unwrap_or_else(|| {
            panic!(
                "feature `distributed` needs the gloo headers (not in the torch wheel): \
                 `apt-get install libgloo-dev`, or build through scripts/cargo, which installs it"
            )
        });
    let mut build = libtorch_cpp(&include);
    build
        .file("csrc/refa_dist.cpp")
        .include(include.join("torch/csrc/api/include"))
        .include(gloo)
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None);
    // The wheel's site-packages: <site>/torch/lib is lib_dir.
    let site = lib_dir.parent().and_then(|torch| torch.parent());
    let nccl_includes = site.map(|site| {
        let nvidia = site.join("nvidia");
        [
            nvidia.join("nccl/include"),
            nvidia.join("cu13/include"),
            nvidia.join("cu13/include/cccl"),
        ]
    });
    let nccl_wanted = env::var("REFA_NCCL").map_or(true, |v| v != "0");
    let nccl_ready = nccl_includes.as_ref().is_some_and(|dirs| {
        dirs[0].join("nccl.h").exists()
            && dirs[1].join("crt/host_config.h").exists()
            && dirs[2].join("nv/target").exists()
    });
    if nccl_wanted && nccl_ready && lib_dir.join("libtorch_cuda.so").exists() {
        for dir in nccl_includes.iter().flatten() {
            build.include(dir);
        }
        build.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    } else if nccl_wanted {
        println!(
            "cargo:warning=refa-loss: building `distributed` without NCCL (Gloo only): the \
             NCCL or CUDA headers are missing (scripts/cargo installs them)"
        );
    }
    build.compile("refa_dist");
}

fn compile_ops(lib_dir: &std::path::Path) {
    let include = torch_include(lib_dir);
    libtorch_cpp(&include)
        .file("csrc/refa_ops.cpp")
        .compile("refa_ops");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    for lib in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
