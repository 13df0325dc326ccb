//! CPU kernels for inference, where a chain of libtorch ops would read the input several times
//! or run one tiny GEMM per instance: each kernel makes one pass over the stacked features of an
//! instance while they sit in the L1 cache (scores, softmax and weighted sums together).
//!
//! They run only where autograd records nothing, on f32/f64 CPU tensors (half-precision
//! attention mixers widen to f32 and take them too); elsewhere (CUDA, training) callers use
//! libtorch ops, which the kernels equal up to rounding (the parity fixtures check both).
//!
//! - [`team`]: how a kernel runs (parts of the batch on libtorch's OpenMP team or on a pool of
//!   tch-mix's own, SIMD builds);
//! - [`memory`]: tensors as slices, and their division among the parts;
//! - [`math`]: the arithmetic the kernels share;
//! - one file per kernel: [`weighted`], [`mod@cross`], [`mod@instance`], [`self_attention`],
//!   [`gemm`] (small products against packed weights).

mod cross;
mod gemm;
mod instance;
mod math;
#[allow(unsafe_code)] // raw views of tensors' memory
mod memory;
mod self_attention;
#[allow(unsafe_code)] // libgomp through C, the SIMD builds, the pool's view of a team
mod team;
mod weighted;

pub(crate) use cross::{cross, cross_small, CrossOutputs, CrossWeights};
pub(crate) use gemm::{linear, pack};
pub(crate) use instance::instance;
pub(crate) use memory::{numel, overlap, Dims};
pub(crate) use self_attention::self_weights;
pub(crate) use team::Call;
pub(crate) use weighted::{global, weighted_sums};

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::mode;

/// Whether the kernels apply to these tensors: CPU, f32 or f64 alike, nothing for autograd.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    let kind = tensors[0].kind();
    let recording = mode::grad_mode() && tensors.iter().any(|t| t.requires_grad());
    !recording
        && matches!(kind, Kind::Float | Kind::Double)
        && tensors.iter().all(|t| t.device() == Device::Cpu && t.kind() == kind)
}

/// Whether a kernel over `n` instances of `work` multiply-adds each runs on the calling thread
/// alone (see `team::part_size`): a batch small enough for one kernel to take the whole call.
pub(crate) fn one_part(n: usize, work: usize) -> bool {
    team::part_size(n, work) >= n
}

/// Output buffers reused from one chunk of a large inference batch to the next, so that each
/// is allocated (and its pages first touched) once per call rather than once per chunk.
#[derive(Default)]
pub(crate) struct Scratch {
    buffers: Vec<(&'static str, Tensor)>,
}

impl Scratch {
    /// An uninitialised contiguous CPU tensor for `name`: the one handed out before under that
    /// name where its shape and kind match. A buffer must not outlive its chunk's work.
    pub(crate) fn take(&mut self, name: &'static str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let fits = |t: &Tensor| t.size() == shape && t.kind() == kind;
        if let Some((_, t)) = self.buffers.iter().find(|(n, t)| *n == name && fits(t)) {
            return Ok(t.shallow_clone());
        }
        let t = Tensor::f_empty(shape, (kind, Device::Cpu))?;
        self.buffers.retain(|(n, _)| *n != name);
        self.buffers.push((name, t.shallow_clone()));
        Ok(t)
    }
}

/// A kernel's view of a tensor: contiguous, with a lazy negation applied (libtorch may hand
/// over such views, whose stored elements are the negated values; real tensors have no lazy
/// conjugation).
fn resolved(t: &Tensor) -> Result<Tensor> {
    Ok(match t.is_neg() {
        true => t.f_resolve_neg()?.f_contiguous()?,
        false => t.f_contiguous()?,
    })
}

/// The sizes of a batch of stacked features: `n` instances of `f` features of width `d`.
#[derive(Debug, Clone, Copy)]
struct Shape {
    n: usize,
    f: usize,
    d: usize,
}

impl Shape {
    /// From libtorch's sizes, which are never negative.
    fn of(n: i64, f: i64, d: i64) -> Self {
        let size = |s: i64| usize::try_from(s).unwrap_or(0);
        Self { n: size(n), f: size(f), d: size(d) }
    }
}

/// Runs `$body` with `T` bound to the element type of `$kind`, f32 or f64; any other kind
/// returns an error from the enclosing function.
macro_rules! dispatch {
    ($kind:expr, |$t:ident| $body:block) => {
        match $kind {
            tch::Kind::Float => {
                type $t = f32;
                $body
            }
            tch::Kind::Double => {
                type $t = f64;
                $body
            }
            kind => {
                return Err($crate::error::MixError::Kind {
                    what: "kernel input",
                    expected: "Float or Double".to_string(),
                    got: kind,
                })
            }
        }
    };
}
use dispatch;
