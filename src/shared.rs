//! [`SharedMixer`]: one frozen copy of a mixer that many threads call at once.

use tch::{nn, Tensor};

use crate::error::Result;
use crate::{Mixer, Spec};

/// An inference-only mixer that any number of threads may call at the same time through
/// `&self` (share it in an `Arc`), with no lock and no per-thread copy of the weights.
///
/// [`SharedMixer::new`] copies the weights once into a private VarStore, frozen (no gradients),
/// that nothing outside the handle can reach; every call runs in eval mode under `no_grad`.
///
/// # Shapes
/// As [`Mixer::f_forward_t`] and [`Mixer::f_importance`].
///
/// ```
/// use std::sync::Arc;
/// use tch::{nn, Device, Kind, Tensor};
/// use tch_mix::{AttentionConfig, CrossAttentionMixer, SharedMixer};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let mix = CrossAttentionMixer::new(&vs.root(), 8, AttentionConfig::default())?;
/// let shared = Arc::new(SharedMixer::new(&mix)?);
/// let workers: Vec<_> = (0..4)
///     .map(|_| {
///         let shared = Arc::clone(&shared);
///         std::thread::spawn(move || {
///             let inp = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
///             shared.forward(&inp, None).map(|out| out.size())
///         })
///     })
///     .collect();
/// for worker in workers {
///     assert_eq!(worker.join().unwrap()?, [2, 8]);
/// }
/// # Ok::<(), tch_mix::MixError>(())
/// ```
#[derive(Debug)]
pub struct SharedMixer {
    mixer: Box<dyn Mixer>,
    /// Holds the frozen copy of the weights; nothing else refers to it.
    _store: nn::VarStore,
}

// SAFETY: `Tensor` is not `Sync` because libtorch's tensors can be written through any handle.
// A `SharedMixer` makes sure that none of its tensors is written once it exists, and that what
// its `&self` methods do is safe from several threads at once:
// - its weights are a private copy (`new` builds a fresh mixer on its own VarStore and copies
//   into it): no handle to them exists outside the struct, and no method hands one out;
// - every method runs the mixer under `tch::no_grad` with `train = false`: libtorch records no
//   autograd graph (so no node takes a reference to a weight and nothing accumulates into a
//   `.grad`), and there is no dropout (no shared random state is drawn);
// - the mixers only read their weights (as inputs of libtorch ops, or as shared slices in the
//   CPU kernels); everything they write (outputs, scratch buffers) is allocated by the call,
//   or is the caller's own buffer of an `_into` method, written after the mixer has computed;
// - reading one libtorch tensor from several threads is safe: sizes, strides, dtype, device
//   and data pointer are immutable after construction, the reference count of every handle
//   (`shallow_clone`, drop) and the version counter are atomic;
// - the one cache a mixer keeps between calls, the attention mixers' derived weights, is behind
//   a `Mutex`, and what it hands out is only read.
#[allow(unsafe_code)]
unsafe impl Sync for SharedMixer {}

impl SharedMixer {
    /// A frozen copy of `mixer`'s weights, on the same device, in the same dtype.
    ///
    /// # Errors
    /// Only what libtorch refuses while copying the weights
    /// ([`MixError::Torch`](crate::MixError::Torch)).
    pub fn new(mixer: &dyn Mixer) -> Result<Self> {
        let mut store = nn::VarStore::new(mixer.device());
        let copy = mixer.fresh_boxed(&store.root())?;
        tch::no_grad(|| -> Result<()> {
            for ((_, mut target), (_, source)) in
                copy.variables().into_iter().zip(mixer.variables())
            {
                target.f_copy_(&source)?;
            }
            Ok(())
        })?;
        store.freeze();
        Ok(Self { mixer: copy, _store: store })
    }

    /// The class and hyper-parameters.
    pub fn spec(&self) -> Spec {
        self.mixer.spec()
    }

    /// The mixed features, in eval mode: as [`Mixer::f_forward_t`] with `train = false`.
    ///
    /// # Shapes
    /// As [`Mixer::f_forward_t`]: `(..., n_features, mod_dim)` to `(..., mod_dim)`.
    ///
    /// # Errors
    /// As [`Mixer::f_forward_t`].
    pub fn forward(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        tch::no_grad(|| self.mixer.f_forward_t(inp, mask, false))
    }

    /// The importance: as [`Mixer::f_importance`].
    ///
    /// # Shapes
    /// As [`Mixer::f_importance`]: `(..., n_features, mod_dim)` to `(..., n_features)`.
    ///
    /// # Errors
    /// As [`Mixer::f_forward_t`].
    pub fn importance(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        tch::no_grad(|| self.mixer.f_importance(inp, mask))
    }

    /// Both in one call: as [`Mixer::f_forward_and_importance_t`] with `train = false`.
    ///
    /// # Shapes
    /// As [`Mixer::f_forward_and_importance_t`].
    ///
    /// # Errors
    /// As [`Mixer::f_forward_t`].
    pub fn forward_and_importance(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        tch::no_grad(|| self.mixer.f_forward_and_importance_t(inp, mask, false))
    }

    /// The mixed features written into `out`, a buffer the caller owns and may reuse: as
    /// [`Mixer::f_forward_into`].
    ///
    /// # Shapes
    /// As [`Mixer::f_forward_into`]: `out` is `(..., mod_dim)` (`(..., 1, mod_dim)` with
    /// `keep_dim`).
    ///
    /// # Errors
    /// As [`Mixer::f_forward_into`].
    pub fn forward_into(
        &self,
        out: &mut Tensor,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        self.mixer.f_forward_into(out, inp, mask)
    }

    /// The importance written into `importance`: as [`Mixer::f_importance_into`].
    ///
    /// # Shapes
    /// As [`Mixer::f_importance_into`]: `importance` is `(..., n_features)`.
    ///
    /// # Errors
    /// As [`Mixer::f_forward_into`].
    pub fn importance_into(
        &self,
        importance: &mut Tensor,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        self.mixer.f_importance_into(importance, inp, mask)
    }

    /// Both in one call, written into the caller's buffers: as
    /// [`Mixer::f_forward_and_importance_into`].
    ///
    /// # Shapes
    /// As [`Mixer::f_forward_and_importance_into`].
    ///
    /// # Errors
    /// As [`Mixer::f_forward_into`].
    pub fn forward_and_importance_into(
        &self,
        out: &mut Tensor,
        importance: &mut Tensor,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        self.mixer.f_forward_and_importance_into(out, importance, inp, mask)
    }
}
