//! Lets the package's own binaries, tests, examples and benches run without `LD_LIBRARY_PATH`.
//!
//! torch-sys publishes the libtorch library folder as `DEP_TCH_LIBTORCH_LIB` (its `links = "tch"`).
//! We give our own link targets an rpath to it, and link `libtorch` with `--no-as-needed`: a Rust
//! binary references no CUDA symbol directly, so without it the linker drops `libtorch_cuda` and
//! `Cuda::is_available()` is false at run time even on a GPU machine.
//! `cargo:rustc-link-arg` does not reach crates that depend on tch-mix. What they need instead:
//! the `cuda` feature keeps libtorch_cuda linked (src/cuda.rs), and the folder is passed on as
//! `DEP_TCH_MIX_LIBTORCH_LIB` (our `links = "tch_mix"`) for a service's one-line build script to
//! give its binary the rpath (see docs/deployment.md).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; binaries will need LD_LIBRARY_PATH"
        );
        return;
    };
    println!("cargo:libtorch_lib={lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    println!("cargo:rustc-link-arg=-L{lib_dir}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
