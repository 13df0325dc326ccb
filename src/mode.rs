//! What a call runs under, as the mixers and the kernels both need to know it: whether autograd
//! records, and whether the dtype is half precision.
//!
//! The one `unsafe` block outside the kernels' two rooms reads libtorch's grad mode, which tch
//! offers no safe way to read.

use tch::Kind;

/// Whether autograd records operations now (it does unless inside `tch::no_grad`).
pub(crate) fn grad_mode() -> bool {
    // SAFETY: sets libtorch's thread-local grad mode and returns the previous value; setting it
    // back at once leaves the state as it was.
    unsafe {
        let previous = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(previous);
        previous != 0
    }
}

/// Whether a mixer of dtype `kind` should take PyTorch's own op sequence rather than its fast
/// path: in half precision while autograd records, so that gradients round as PyTorch's do.
/// (In f32/f64 the fast paths agree with PyTorch to rounding, gradients included.)
pub(crate) fn use_reference(kind: Kind) -> bool {
    is_half(kind) && grad_mode()
}

/// Whether `kind` is a 16-bit float (bfloat16 or float16).
pub(crate) fn is_half(kind: Kind) -> bool {
    matches!(kind, Kind::BFloat16 | Kind::Half)
}
