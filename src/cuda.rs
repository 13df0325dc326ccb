//! Keeps libtorch's CUDA library in the link of every binary that uses tch-mix, with the
//! `cuda` feature.
//!
//! A Rust binary calls no CUDA symbol of libtorch directly, so the linker's `--as-needed` drops
//! `libtorch_cuda` and `tch::Cuda::is_available()` is false at run time even on a GPU machine.
//! A link argument from a dependency's build script does not reach the final link, but a
//! reference to one of the library's symbols does: the mixers' constructors take the address of
//! `at::cuda::getCurrentCUDABlasHandle()` (never calling it), which makes the library needed.
//! Without the feature (CPU-only libtorch, which has no `libtorch_cuda`) this is a no-op.

#[cfg(feature = "cuda")]
#[link(name = "torch_cuda")]
extern "C" {
    /// `at::cuda::getCurrentCUDABlasHandle()`, exported by libtorch_cuda in every supported
    /// PyTorch; only its address is taken.
    #[link_name = "_ZN2at4cuda24getCurrentCUDABlasHandleEv"]
    fn libtorch_cuda_symbol();
}

/// Makes the binary need libtorch_cuda (with the `cuda` feature).
#[inline]
pub(crate) fn keep_linked() {
    #[cfg(feature = "cuda")]
    std::hint::black_box(libtorch_cuda_symbol as unsafe extern "C" fn());
}
