//! What the two attention mixers share: their hyper-parameters, the [`Attend`] trait through
//! which each says how its queries attend, and [`AttentionCore`], which validates the input,
//! flattens its leading dimensions, chooses PyTorch's op sequence or the fast path, and applies
//! swak's tail (dropout, skip, keep_dim).

use tch::{nn, Device, Kind, Tensor};

use super::fast::{Derived, KeyWeights, Mixed, Packed, Request, LARGE_BATCH};
use super::multihead::MultiheadAttention;
use crate::error::Result;
use crate::kernels::{self, Scratch};
use crate::{mixer, mode};

/// Hyper-parameters of the attention mixers, named as in swak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// Number of attention heads; must divide `mod_dim`. Default 1.
    pub n_heads: i64,
    /// Learn biases in the attention projections. Default `true`.
    pub bias: bool,
    /// Dropout on the attention weights and on the mixed output in training mode, in `[0, 1)`.
    /// Default 0.
    pub dropout: f64,
    /// Add the mean of the features to the mix (a residual connection). Default `true`.
    pub skip: bool,
    /// Keep the feature dimension as size 1 instead of squeezing it. Default `false`.
    pub keep_dim: bool,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        Self { n_heads: 1, bias: true, dropout: 0.0, skip: true, keep_dim: false }
    }
}

/// What makes an attention mixer cross- or self-attention: which queries attend, and how their
/// weights become one weight per feature. Both attention mixers implement it; the shared code
/// in this module and in [`super::fast`] is generic over it.
pub(crate) trait Attend {
    /// The spec of a mixer of this kind.
    fn spec(mod_dim: i64, config: AttentionConfig) -> crate::Spec;

    /// Bytes an inference chunk holds per byte of its input (queries, keys and their scores),
    /// which sizes the chunks so that they stay in the cache.
    const CHUNK_WIDTH: i64;

    /// The query of PyTorch's op sequence for `n` instances of width `d`: `None` where the
    /// features themselves attend.
    fn query(n: i64, d: i64, kind: Kind, device: Device) -> Result<Option<Tensor>>;

    /// Whether the mixer projects its inputs into queries and keys (self-attention), which
    /// small batches then take from packed weights (see [`super::fast::Packed`]).
    const PROJECTS_QUERIES_KEYS: bool;

    /// What the scores need from the weights beyond the value projection, derived once and
    /// cached with it (see [`Derived`]).
    fn derive(attention: &MultiheadAttention) -> Result<Option<Tensor>>;

    /// The softmaxed attention weights per head, through libtorch ops: `(N, H, F)` for one
    /// query, `(N, H, L, F)` for `L` queries.
    /// `None` where these weights would differ from PyTorch's on this input: the caller then
    /// takes PyTorch's op sequence.
    fn head_weights(
        attention: &MultiheadAttention,
        derived: &Derived,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>>;

    /// One weight per head and key `(N, H, F)` from [`Attend::head_weights`].
    fn per_key(weights: Tensor) -> Result<Tensor>;

    /// The one-pass CPU kernels for inference: the per-key weights `(N, H, F)` and, if
    /// `output`, the pooled inputs and their mean `(H + 1, N, D)`. Called only where the
    /// kernels apply to the input, mask and weights (see `kernels::applies`: CPU, f32/f64, no
    /// autograd) and there is no dropout; `packed` where the batch is small enough for the
    /// packed projections. `None` where the weights would differ from PyTorch's
    /// on this input (cross-attention's folded scores on an input with infinities): the caller
    /// then takes PyTorch's op sequence.
    fn kernel(
        attention: &MultiheadAttention,
        derived: &Derived,
        packed: Option<&Packed>,
        inp: &Tensor,
        mask: Option<&Tensor>,
        output: bool,
        scratch: &mut Scratch,
    ) -> Result<Option<KeyWeights>>;

    /// The multiply-adds per instance of [`Attend::small`] with `f` features of width `d` and
    /// `h` heads; `None` where the mixer has no such kernel.
    fn small_work(f: usize, d: usize, h: usize) -> Option<usize> {
        let _ = (f, d, h);
        None
    }

    /// A whole inference call on a small batch in one kernel, from the input `(N, F, D)` (its
    /// `shape`) and the mask (bool or additive, `(N, F)`) to the mixed vectors `(N, D)` (plus the
    /// mean over the features with `skip`) and the importance `(N, F)`, written into `outputs`.
    /// Called only where [`Attend::small_work`] is `Some` and the kernels apply. `false` where
    /// the kernel declined the input (see [`Attend::kernel`]).
    fn small(
        attention: &MultiheadAttention,
        derived: &Derived,
        inp: &Tensor,
        shape: (i64, i64, i64),
        mask: Option<&Tensor>,
        skip: bool,
        outputs: kernels::CrossOutputs<'_>,
    ) -> Result<bool> {
        let _ = (attention, derived, inp, shape, mask, skip, outputs);
        Ok(false)
    }
}

/// What a call asks for: the mixed features, their importance, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    Output,
    Importance,
    Both,
}

impl Want {
    pub(crate) fn output(self) -> bool {
        matches!(self, Want::Output | Want::Both)
    }

    pub(crate) fn importance(self) -> bool {
        matches!(self, Want::Importance | Want::Both)
    }
}

/// The state of an attention mixer: the attention module and the hyper-parameters.
#[derive(Debug)]
pub(crate) struct AttentionCore {
    pub(crate) attention: MultiheadAttention,
    pub(crate) mod_dim: i64,
    pub(crate) config: AttentionConfig,
}

/// An input flattened to `(N, F, D)` with its additive mask `(N, F)` and its leading dimensions.
struct Batch {
    inp: Tensor,
    mask: Option<Tensor>,
    leading: Vec<i64>,
}

impl AttentionCore {
    pub(crate) fn new(
        path: &nn::Path,
        mod_dim: i64,
        config: AttentionConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        mixer::check_dropout(config.dropout)?;
        let attention = MultiheadAttention::new(
            &(path / "attention"),
            mod_dim,
            config.n_heads,
            config.bias,
            kind,
            device,
        )?;
        Ok(Self { attention, mod_dim, config })
    }

    pub(crate) fn kind(&self) -> Kind {
        self.attention.out_proj_weight.kind()
    }

    pub(crate) fn device(&self) -> Device {
        self.attention.out_proj_weight.device()
    }

    /// The variables under their swak `state_dict` keys (`attention.in_proj_weight`, ...).
    pub(crate) fn variables(&self) -> Vec<(&'static str, Tensor)> {
        let prefixed = |key| match key {
            "in_proj_weight" => "attention.in_proj_weight",
            "in_proj_bias" => "attention.in_proj_bias",
            "out_proj.weight" => "attention.out_proj.weight",
            _ => "attention.out_proj.bias",
        };
        self.attention.variables().into_iter().map(|(key, t)| (prefixed(key), t)).collect()
    }

    /// Validates `inp` and `mask` (see [`mixer::check_input`]).
    fn check(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<()> {
        mixer::check_input(inp, mask, self.mod_dim, None, self.kind(), self.device())
    }

    /// `None` for an input without features, else the flattened batch of a checked input.
    fn batch(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<Option<Batch>> {
        let shape = inp.size();
        let (features, leading) = (shape[shape.len() - 2], shape[..shape.len() - 2].to_vec());
        if features == 0 {
            return Ok(None);
        }
        let mask = match mask {
            Some(mask) => Some(self.attention.additive_mask(&mask.f_reshape([-1, features])?)?),
            None => None,
        };
        Ok(Some(Batch { inp: inp.f_reshape([-1, features, self.mod_dim])?, mask, leading }))
    }

    /// The pooling along PyTorch's own op sequence ([`MultiheadAttention::output`] and
    /// [`MultiheadAttention::weights`], averaged over the queries), for half precision under
    /// autograd, and where the fast path declines an input.
    fn reference<A: Attend>(&self, batch: &Batch, dropout: f64, want: Want) -> Result<Mixed> {
        let (n, _, d) = batch.inp.size3()?;
        let query = A::query(n, d, self.kind(), self.device())?;
        let (query, inp, mask) = (query.as_ref(), &batch.inp, batch.mask.as_ref());
        let mean_over_queries = |t: Tensor| t.f_mean_dim(1, false, None::<Kind>);
        let mixed = match want.output() {
            true => Some(mean_over_queries(self.attention.output(query, inp, mask, dropout)?)?),
            false => None,
        };
        let importance = match want.importance() {
            true => Some(mean_over_queries(self.attention.weights(query, inp, mask)?)?),
            false => None,
        };
        Ok(Mixed { mixed, importance })
    }

    /// A whole inference call in one kernel ([`Attend::small`]), for a batch small enough that
    /// the kernels would run it on the calling thread alone: the outputs as [`Self::mix`] gives
    /// them, written into the caller's `buffers` where there are some. `None` where the kernel
    /// does not apply (the mixer has none, training with dropout, autograd recording, half
    /// precision, CUDA, a larger batch, a non-contiguous input or mask, a float mask of another
    /// dtype, a buffer that does not fit, an input with infinities): the caller takes the
    /// usual path. `inp` and `mask` are checked already.
    fn small<A: Attend>(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
        want: Want,
        buffers: mixer::Buffers<'_>,
    ) -> Result<Option<(Option<Tensor>, Option<Tensor>)>> {
        let AttentionConfig { dropout, skip, keep_dim, n_heads, .. } = self.config;
        let shape = kernels::Dims::of(inp);
        let (f, d) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let size = |s: i64| usize::try_from(s).unwrap_or(0);
        let work = A::small_work(size(f), size(d), size(n_heads));
        let n = shape.numel() / size(f * d).max(1);
        let Some(work) = work.filter(|_| f > 0 && n > 0 && (!train || dropout == 0.0)) else {
            return Ok(None);
        };
        let resolved = |t: &Tensor| t.is_contiguous() && !t.is_neg();
        let mask_fits =
            mask.is_none_or(|m| resolved(m) && (m.kind() == Kind::Bool || m.kind() == inp.kind()));
        let small = (n as i64) < LARGE_BATCH && kernels::one_part(n, work);
        if !small || !mask_fits || !resolved(inp) {
            return Ok(None);
        }
        if !kernels::applies(&[inp, &self.attention.in_proj_weight]) {
            return Ok(None);
        }
        let wanted = (want.output(), want.importance());
        let Some((mut mixed, mut importance)) =
            mixer::kernel_outputs(inp, mask, keep_dim, wanted, buffers)?
        else {
            return Ok(None);
        };
        let derived = self.attention.derived::<A>(true)?;
        let outputs =
            kernels::CrossOutputs { mixed: mixed.as_mut(), importance: importance.as_mut() };
        let shape = (n as i64, f, d);
        if !A::small(&self.attention, &derived, inp, shape, mask, skip, outputs)? {
            return Ok(None);
        }
        Ok(Some((mixed, importance)))
    }

    /// [`Self::small`] for the `_into` calls (see [`mixer::into_buffers`]): `false` where it
    /// does not take the call (nothing is then written).
    pub(crate) fn write_direct<A: Attend>(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        buffers: mixer::Buffers<'_>,
    ) -> Result<bool> {
        self.check(inp, mask)?;
        Ok(self.small::<A>(inp, mask, false, buffers.want(), buffers)?.is_some())
    }

    /// Runs one attention mixer: the mixed features `(..., mod_dim)` (or `(..., 1, mod_dim)`
    /// with `keep_dim`) and the importance `(..., n_features)`, as wanted.
    pub(crate) fn mix<A: Attend>(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
        want: Want,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _call = kernels::Call::start(inp);
        self.check(inp, mask)?;
        if let Some(outputs) = self.small::<A>(inp, mask, train, want, Default::default())? {
            return Ok(outputs);
        }
        let Some(batch) = self.batch(inp, mask)? else {
            let shape = inp.size();
            let none = Tensor::f_zeros(&shape[..shape.len() - 1], (self.kind(), self.device()))?;
            let mixed = mixer::without_features(inp, self.config.keep_dim)?;
            return Ok((want.output().then_some(mixed), want.importance().then_some(none)));
        };
        let AttentionConfig { dropout, skip, keep_dim, .. } = self.config;
        let p = if train { dropout } else { 0.0 };
        // The fast path, but in half precision while autograd records: PyTorch's own op
        // sequence, so that gradients round as PyTorch's do. The fast path adds the skip term
        // itself where no output dropout comes between; it may also decline an input whose
        // numbers it cannot reproduce in its own order (see `Attend::kernel`).
        let skip_inside = skip && p == 0.0;
        let fast = match mode::use_reference(self.kind()) {
            true => None,
            false => {
                let request = Request { want, skip: skip_inside, dropout: p };
                self.attention.pooled::<A>(&batch.inp, batch.mask.as_ref(), request)?
            }
        };
        let (Mixed { mixed, importance }, skip_after) = match fast {
            Some(mixed) => (mixed, skip && !skip_inside),
            None => (self.reference::<A>(&batch, p, want)?, skip),
        };
        let leading = |last: i64| batch.leading.iter().copied().chain([last]).collect::<Vec<_>>();
        let mixed = match mixed {
            Some(mixed) => {
                let mut shape = leading(1);
                shape.push(self.mod_dim);
                let mixed = mixed.f_reshape(shape)?;
                Some(mixer::finish(mixed, inp, dropout, skip_after, keep_dim, train)?)
            }
            None => None,
        };
        let importance = match importance {
            Some(importance) => Some(importance.f_reshape(leading(importance.size()[1]))?),
            None => None,
        };
        Ok((mixed, importance))
    }
}

/// Implements the constructor and accessors, [`crate::Mixer`] and tch's `ModuleT` for an
/// attention mixer `$name` with a field `core: AttentionCore` and an [`Attend`] implementation:
/// everything but the attending is the core's.
macro_rules! impl_attention_mixer {
    ($name:ident) => {
        impl $name {
            /// Creates the mixer with its variables `attention.in_proj_weight`,
            /// `attention.in_proj_bias`, `attention.out_proj.weight` and `attention.out_proj.bias`
            /// under `path`, in the VarStore's dtype and device, initialised like PyTorch's
            /// `nn.MultiheadAttention`.
            ///
            /// # Errors
            /// [`MixError`](crate::MixError)`::Config` for a `mod_dim` below 1, `n_heads` below 1
            /// or not dividing `mod_dim`, or a `dropout` outside `[0, 1)`; `DuplicateVariable`
            /// where `path` already holds the variables.
            pub fn new(
                path: &tch::nn::Path,
                mod_dim: i64,
                config: $crate::AttentionConfig,
            ) -> $crate::Result<Self> {
                Self::build(path, mod_dim, config, path.kind(), path.device())
            }

            /// [`Self::new`] in `kind` on `device`.
            pub(crate) fn build(
                path: &tch::nn::Path,
                mod_dim: i64,
                config: $crate::AttentionConfig,
                kind: tch::Kind,
                device: tch::Device,
            ) -> $crate::Result<Self> {
                let core =
                    $crate::attention::AttentionCore::new(path, mod_dim, config, kind, device)?;
                Ok(Self { core })
            }

            /// The hyper-parameters.
            pub fn config(&self) -> $crate::AttentionConfig {
                self.core.config
            }

            /// The attention module (its tensors are public).
            pub fn attention(&self) -> &$crate::MultiheadAttention {
                &self.core.attention
            }
        }

        impl $crate::Mixer for $name {
            fn mod_dim(&self) -> i64 {
                self.core.mod_dim
            }

            fn device(&self) -> tch::Device {
                self.core.device()
            }

            fn kind(&self) -> tch::Kind {
                self.core.kind()
            }

            fn skip(&self) -> bool {
                self.core.config.skip
            }

            fn keep_dim(&self) -> bool {
                self.core.config.keep_dim
            }

            fn dropout(&self) -> f64 {
                self.core.config.dropout
            }

            fn f_forward_t(
                &self,
                inp: &tch::Tensor,
                mask: Option<&tch::Tensor>,
                train: bool,
            ) -> $crate::Result<tch::Tensor> {
                let want = $crate::attention::Want::Output;
                let (mixed, _) = self.core.mix::<Self>(inp, mask, train, want)?;
                Ok(mixed.expect("asked for"))
            }

            fn f_importance(
                &self,
                inp: &tch::Tensor,
                mask: Option<&tch::Tensor>,
            ) -> $crate::Result<tch::Tensor> {
                let want = $crate::attention::Want::Importance;
                let (_, importance) = self.core.mix::<Self>(inp, mask, false, want)?;
                Ok(importance.expect("asked for"))
            }

            fn f_forward_and_importance_t(
                &self,
                inp: &tch::Tensor,
                mask: Option<&tch::Tensor>,
                train: bool,
            ) -> $crate::Result<(tch::Tensor, tch::Tensor)> {
                let want = $crate::attention::Want::Both;
                let (mixed, importance) = self.core.mix::<Self>(inp, mask, train, want)?;
                Ok((mixed.expect("asked for"), importance.expect("asked for")))
            }

            fn f_forward_into(
                &self,
                out: &mut tch::Tensor,
                inp: &tch::Tensor,
                mask: Option<&tch::Tensor>,
            ) -> $crate::Result<()> {
                let direct = |buffers: $crate::mixer::Buffers<'_>| {
                    self.core.write_direct::<Self>(inp, mask, buffers)
                };
                $crate::mixer::into_buffers(self, inp, mask, Some(out), None, direct)
            }

            fn f_importance_into(
                &self,
                importance: &mut tch::Tensor,
                inp: &tch::Tensor,
                mask: Option<&tch::Tensor>,
            ) -> $crate::Result<()> {
                let direct = |buffers: $crate::mixer::Buffers<'_>| {
                    self.core.write_direct::<Self>(inp, mask, buffers)
                };
                $crate::mixer::into_buffers(self, inp, mask, None, Some(importance), direct)
            }

            fn f_forward_and_importance_into(
                &self,
                out: &mut tch::Tensor,
                importance: &mut tch::Tensor,
                inp: &tch::Tensor,
                mask: Option<&tch::Tensor>,
            ) -> $crate::Result<()> {
                let direct = |buffers: $crate::mixer::Buffers<'_>| {
                    self.core.write_direct::<Self>(inp, mask, buffers)
                };
                $crate::mixer::into_buffers(self, inp, mask, Some(out), Some(importance), direct)
            }

            fn reset_parameters(&mut self) -> $crate::Result<()> {
                self.core.attention.reset_parameters()
            }

            fn variables(&self) -> Vec<(&'static str, tch::Tensor)> {
                self.core.variables()
            }

            fn spec(&self) -> $crate::Spec {
                let (mod_dim, config) = (self.core.mod_dim, self.core.config);
                <Self as $crate::attention::Attend>::spec(mod_dim, config)
            }

            fn fresh(&self, path: &tch::nn::Path) -> $crate::Result<Self> {
                let (mod_dim, config) = (self.core.mod_dim, self.core.config);
                Self::build(path, mod_dim, config, self.core.kind(), self.core.device())
            }
        }

        $crate::mixer::impl_module_t!($name);
    };
}
pub(crate) use impl_attention_mixer;
