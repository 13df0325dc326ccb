//! The [`Mixer`] trait (swak's `Mixer`/`Block`) and the pieces every mixer shares: input and mask
//! validation, variable creation, and the common tail of a forward pass (dropout, skip, keep_dim).

use tch::{nn, Device, Kind, Tensor};

use crate::attention::Want;
use crate::checkpoint::{self, StateDict};
use crate::error::{MixError, Result};
use crate::spec::Spec;
use crate::{kernels, mode};

/// A module that combines stacked feature vectors `(..., n_features, mod_dim)` into `(..., mod_dim)`.
///
/// Mirrors swak's `Mixer` (and its base `Block`). All four mixers of tch-mix implement it, so they
/// can be swapped for one another, boxed as `Box<dyn Mixer>`, and checked against fixtures alike.
pub trait Mixer: std::fmt::Debug + Send {
    /// The size of each feature vector, the last dimension of the input.
    fn mod_dim(&self) -> i64;

    /// The device all weights reside on (swak's `device`).
    fn device(&self) -> Device;

    /// The element type of all weights (swak's `dtype`).
    fn kind(&self) -> Kind;

    /// Whether the mean of the features is added to the mixed output (swak's `skip`).
    fn skip(&self) -> bool;

    /// Whether the feature dimension is kept as size 1 in the output (swak's `keep_dim`).
    fn keep_dim(&self) -> bool;

    /// The dropout probability applied in training mode (swak's `dropout`).
    fn dropout(&self) -> f64;

    /// Mixes the features of `inp`.
    ///
    /// `mask` is a padding mask (bool: `true` = ignore that feature; float: added to the attention
    /// scores). The weight mixers check its shape and otherwise ignore it, as swak does.
    /// `train` turns dropout on.
    ///
    /// # Shapes
    /// - `inp`: `(..., n_features, mod_dim)`, at least 2-D.
    /// - `mask`: `(..., n_features)`, the input's shape without its last dimension.
    /// - returns `(..., mod_dim)`, or `(..., 1, mod_dim)` with `keep_dim`.
    ///
    /// # Errors
    /// [`MixError::Shape`], [`MixError::Kind`] or [`MixError::Device`] naming what was expected and
    /// what came, for an input or mask of the wrong rank, sizes, dtype or device; never a panic.
    fn f_forward_t(&self, inp: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor>;

    /// Per-instance importance of each feature: the weights of the mix (swak's `importance`).
    ///
    /// # Shapes
    /// - `inp`: `(..., n_features, mod_dim)`, `mask`: `(..., n_features)`.
    /// - returns `(..., n_features)`.
    ///
    /// # Errors
    /// As [`Mixer::f_forward_t`].
    fn f_importance(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<Tensor>;

    /// The mixed features and the importance of the same batch in one call, sharing the work
    /// both need (swak computes them in two passes). The importance is the eval-mode one (no
    /// dropout), as from [`Mixer::f_importance`]; `train` applies to the mixed features.
    ///
    /// # Shapes
    /// As [`Mixer::f_forward_t`] and [`Mixer::f_importance`]: returns `((..., mod_dim), (..., n_features))`.
    ///
    /// # Errors
    /// As [`Mixer::f_forward_t`].
    fn f_forward_and_importance_t(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        Ok((self.f_forward_t(inp, mask, train)?, self.f_importance(inp, mask)?))
    }

    /// Writes the mixed features of `inp` into `out`, a tensor the caller owns and may reuse
    /// from call to call: the values, bit for bit, of [`Mixer::f_forward_t`] with
    /// `train = false`. An inference call: no dropout, and nothing recorded for autograd (as
    /// under `tch::no_grad`), whatever requires a gradient.
    ///
    /// On the CPU in f32 or f64, a contiguous `out` is written by the kernels directly rather
    /// than copied from a result of their own (the global and instance weights at any batch,
    /// cross-attention at batches small enough for one thread); elsewhere (self-attention,
    /// CUDA, half precision, a strided `out` or one inside `inp`) the result is computed, then
    /// copied in. As for any in-place op, no other thread may use `out` during the call.
    ///
    /// # Shapes
    /// - `inp`, `mask`: as [`Mixer::f_forward_t`];
    /// - `out`: what [`Mixer::f_forward_t`] returns, `(..., mod_dim)` or `(..., 1, mod_dim)`
    ///   with `keep_dim`, in the mixer's dtype, on its device (any strides).
    ///
    /// # Errors
    /// As [`Mixer::f_forward_t`]; [`MixError::Shape`], [`MixError::Kind`] or
    /// [`MixError::Device`] for an `out` of another shape, dtype or device, which is then left
    /// as it was.
    fn f_forward_into(&self, out: &mut Tensor, inp: &Tensor, mask: Option<&Tensor>) -> Result<()> {
        forward_into(self, out, inp, mask)
    }

    /// Writes the importance of each feature into `importance`, a tensor the caller owns: the
    /// values, bit for bit, of [`Mixer::f_importance`], recording nothing for autograd.
    ///
    /// # Shapes
    /// - `inp`, `mask`: as [`Mixer::f_importance`];
    /// - `importance`: `(..., n_features)`, in the mixer's dtype, on its device.
    ///
    /// # Errors
    /// As [`Mixer::f_forward_into`].
    fn f_importance_into(
        &self,
        importance: &mut Tensor,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        importance_into(self, importance, inp, mask)
    }

    /// [`Mixer::f_forward_into`] and [`Mixer::f_importance_into`] in one call: the values, bit
    /// for bit, of [`Mixer::f_forward_and_importance_t`] with `train = false`. Neither buffer
    /// is written unless both fit.
    ///
    /// # Shapes
    /// As [`Mixer::f_forward_into`] and [`Mixer::f_importance_into`].
    ///
    /// # Errors
    /// As [`Mixer::f_forward_into`].
    fn f_forward_and_importance_into(
        &self,
        out: &mut Tensor,
        importance: &mut Tensor,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        forward_and_importance_into(self, out, importance, inp, mask)
    }

    /// Re-initialises every weight in place with swak's (PyTorch's) initial distributions.
    ///
    /// # Errors
    /// Only what libtorch refuses ([`MixError::Torch`]).
    fn reset_parameters(&mut self) -> Result<()>;

    /// The weights under their PyTorch `state_dict` keys, relative to the mixer
    /// (`coeffs`, `project.weight`, `attention.in_proj_weight`, ...), in `state_dict` order.
    fn variables(&self) -> Vec<(&'static str, Tensor)>;

    /// The class and hyper-parameters: enough, with the weights, dtype and device, to build an
    /// identical mixer.
    fn spec(&self) -> Spec;

    /// The number of features, for the mixers that fix it (global and instance weights).
    fn n_features(&self) -> Option<i64> {
        self.spec().n_features()
    }

    /// The number of attention heads, for the attention mixers.
    fn n_heads(&self) -> Option<i64> {
        self.spec().n_heads()
    }

    /// A fresh, re-initialised mixer with identical hyper-parameters, device and dtype, whose
    /// variables are created on `path` (swak's `new()`).
    ///
    /// # Errors
    /// [`MixError::DuplicateVariable`] where `path` already holds the mixer's variable names.
    fn fresh(&self, path: &nn::Path) -> Result<Self>
    where
        Self: Sized;

    /// [`Mixer::fresh`] for a trait object: a boxed fresh mixer of the same class.
    fn fresh_boxed(&self, path: &nn::Path) -> Result<Box<dyn Mixer>> {
        self.spec().build_as(path, self.kind(), self.device())
    }

    /// Copies PyTorch-trained weights into the mixer, strictly like
    /// `load_state_dict(strict=True)`: `state`'s keys must be exactly [`Mixer::variables`]' keys,
    /// with the same shapes; values are converted to the mixer's dtype and device. For a mixer
    /// inside a bigger model, pass `state.sub("mix")`.
    ///
    /// Where the state's metadata describes a mixer at its root ([`StateDict::spec`], as in
    /// files that tch-mix or `tch_mix_tools.save` wrote), that mixer must be of this one's
    /// class and hyper-parameters (dropout aside): else an error names both, and nothing is
    /// copied. A state without that metadata loads on keys and shapes alone.
    ///
    /// # Errors
    /// [`MixError::StrictLoad`] listing every missing key, unexpected key and shape mismatch;
    /// [`MixError::Config`] where the state's metadata describes another mixer. Nothing is copied
    /// unless everything fits.
    fn load_state(&self, state: &StateDict) -> Result<()> {
        if let Some(saved) = state.spec("")? {
            self.spec().check_fits(&saved)?;
        }
        let targets = self.variables().into_iter().map(|(key, t)| (key.to_string(), t)).collect();
        checkpoint::copy_strict(targets, state)
    }

    /// Reads the mixer's weights from a file ([`StateDict::from_file`]: safetensors, a
    /// `torch.save` state dict, or a checkpoint's `model`) where they lie under `prefix` (`mix`
    /// for `mix.coeffs`, ...; empty for none), and loads them with [`Mixer::load_state`],
    /// checking the hyper-parameters that the file carries for that prefix.
    ///
    /// # Errors
    /// As [`StateDict::from_file`] and [`Mixer::load_state`].
    fn load_file(&self, path: &std::path::Path, prefix: &str) -> Result<()> {
        self.load_state(&StateDict::from_file(path)?.sub(prefix))
    }

    /// Saves the mixer's weights under `prefix` (`mix` gives `mix.coeffs`, ...; empty for none)
    /// with its class and hyper-parameters as metadata: [`StateDict::from_mixer`] then
    /// [`StateDict::save`] (safetensors for `.safetensors`, `torch.save`'s format for `.pt` and
    /// `.pth`, written atomically).
    ///
    /// # Errors
    /// As [`StateDict::save`]: an extension other than `.safetensors`, `.pt` or `.pth`, or what the
    /// file system refuses ([`MixError::Io`]); `path` is then left as it was.
    fn save_file(&self, path: &std::path::Path, prefix: &str) -> Result<()> {
        StateDict::from_mixer(self, prefix).save(path)
    }
}

/// Checks a dropout probability: swak's `nn.Dropout` takes `[0, 1]`, but `p = 1` zeroes the mix.
pub(crate) fn check_dropout(dropout: f64) -> Result<()> {
    if (0.0..1.0).contains(&dropout) {
        Ok(())
    } else {
        Err(MixError::Config(format!("dropout must lie in [0, 1), got {dropout}")))
    }
}

/// Checks a size given at construction.
pub(crate) fn check_size(name: &str, value: i64, min: i64) -> Result<()> {
    if value >= min {
        Ok(())
    } else {
        Err(MixError::Config(format!("{name} must be at least {min}, got {value}")))
    }
}

/// The product of sizes given at construction, `name` saying what it is: an error where it
/// does not fit in an `i64` (libtorch's sizes), instead of a wrapped, wrong shape.
pub(crate) fn checked_product(name: &str, factors: &[i64]) -> Result<i64> {
    factors.iter().try_fold(1i64, |product, &factor| product.checked_mul(factor)).ok_or_else(|| {
        MixError::Config(format!("{name} = {factors:?} multiplied overflows a 64-bit size"))
    })
}

/// Checks that `inp` is a `(..., n_features, mod_dim)` tensor of the mixer's dtype and device,
/// and that `mask` fits it (see [`check_mask`]): the one validation at the start of every call.
/// `n_features` is `None` for the attention mixers, which take any number of features.
pub(crate) fn check_input(
    inp: &Tensor,
    mask: Option<&Tensor>,
    mod_dim: i64,
    n_features: Option<i64>,
    kind: Kind,
    device: Device,
) -> Result<()> {
    let shape = kernels::Dims::of(inp);
    let fits = shape.len() >= 2
        && shape[shape.len() - 1] == mod_dim
        && n_features.is_none_or(|n| shape[shape.len() - 2] == n);
    if !fits {
        let features = n_features.map_or("n_features".to_string(), |n| n.to_string());
        let expected = format!("(..., {features}, {mod_dim})");
        return Err(MixError::Shape { what: "input", expected, got: shape.to_vec() });
    }
    if inp.kind() != kind {
        return Err(MixError::Kind {
            what: "input",
            expected: format!("{kind:?}"),
            got: inp.kind(),
        });
    }
    if inp.device() != device {
        return Err(MixError::Device { what: "input", expected: device, got: inp.device() });
    }
    check_mask(mask, &shape, device)
}

/// Checks that a padding mask is bool or floating point, on the input's device, and shaped like
/// the input (of sizes `shape`, on `device`) without its last dimension.
fn check_mask(mask: Option<&Tensor>, shape: &[i64], device: Device) -> Result<()> {
    let Some(mask) = mask else { return Ok(()) };
    let expected = &shape[..shape.len() - 1];
    if *kernels::Dims::of(mask) != *expected {
        let dims: Vec<String> = expected.iter().map(i64::to_string).collect();
        let expected = format!("({}) (the input's shape without its last dim)", dims.join(", "));
        return Err(MixError::Shape { what: "mask", expected, got: mask.size() });
    }
    if mask.kind() != Kind::Bool && !mask.is_floating_point() {
        return Err(MixError::Kind {
            what: "mask",
            expected: "Bool or a floating-point kind".into(),
            got: mask.kind(),
        });
    }
    if mask.device() != device {
        return Err(MixError::Device { what: "mask", expected: device, got: mask.device() });
    }
    Ok(())
}

/// Checks that a caller's buffer `buffer` can hold `value`: the same shape, dtype and device.
fn check_buffer(what: &'static str, buffer: &Tensor, value: &Tensor) -> Result<()> {
    if !buffer.defined() || buffer.size() != value.size() {
        let got = if buffer.defined() { buffer.size() } else { Vec::new() };
        return Err(MixError::Shape { what, expected: format!("{:?}", value.size()), got });
    }
    if buffer.kind() != value.kind() {
        let expected = format!("{:?}", value.kind());
        return Err(MixError::Kind { what, expected, got: buffer.kind() });
    }
    if buffer.device() != value.device() {
        return Err(MixError::Device { what, expected: value.device(), got: buffer.device() });
    }
    Ok(())
}

/// [`Mixer::f_forward_into`] by way of [`Mixer::f_forward_t`]: the result copied into `out`.
pub(crate) fn forward_into<M: Mixer + ?Sized>(
    mixer: &M,
    out: &mut Tensor,
    inp: &Tensor,
    mask: Option<&Tensor>,
) -> Result<()> {
    let mixed = tch::no_grad(|| mixer.f_forward_t(inp, mask, false))?;
    write_into([("output buffer", out, &mixed)])
}

/// [`Mixer::f_importance_into`] by way of [`Mixer::f_importance`].
pub(crate) fn importance_into<M: Mixer + ?Sized>(
    mixer: &M,
    importance: &mut Tensor,
    inp: &Tensor,
    mask: Option<&Tensor>,
) -> Result<()> {
    let weights = tch::no_grad(|| mixer.f_importance(inp, mask))?;
    write_into([("importance buffer", importance, &weights)])
}

/// [`Mixer::f_forward_and_importance_into`] by way of [`Mixer::f_forward_and_importance_t`].
pub(crate) fn forward_and_importance_into<M: Mixer + ?Sized>(
    mixer: &M,
    out: &mut Tensor,
    importance: &mut Tensor,
    inp: &Tensor,
    mask: Option<&Tensor>,
) -> Result<()> {
    let (mixed, weights) = tch::no_grad(|| mixer.f_forward_and_importance_t(inp, mask, false))?;
    write_into([("output buffer", out, &mixed), ("importance buffer", importance, &weights)])
}

/// The caller's buffers of an `_into` call, one for each output it asks for; none for the
/// allocating calls.
#[derive(Default)]
pub(crate) struct Buffers<'a> {
    pub(crate) mixed: Option<&'a mut Tensor>,
    pub(crate) importance: Option<&'a mut Tensor>,
}

impl Buffers<'_> {
    /// What an `_into` call with these buffers asks for.
    pub(crate) fn want(&self) -> Want {
        match (self.mixed.is_some(), self.importance.is_some()) {
            (true, false) => Want::Output,
            (false, true) => Want::Importance,
            _ => Want::Both,
        }
    }
}

/// The `_into` calls of a mixer whose kernels can write into the caller's buffers: `direct`
/// checks the input and writes the buffers (eval mode, no autograd) where the kernels take the
/// call, returning `true`; where it returns `false` (nothing written), the allocating call's
/// result is copied in.
pub(crate) fn into_buffers<M: Mixer + ?Sized>(
    mixer: &M,
    inp: &Tensor,
    mask: Option<&Tensor>,
    mut mixed: Option<&mut Tensor>,
    mut importance: Option<&mut Tensor>,
    direct: impl FnOnce(Buffers<'_>) -> Result<bool>,
) -> Result<()> {
    let written = {
        let _call = kernels::Call::start(inp);
        let _no_grad = tch::no_grad_guard();
        direct(Buffers { mixed: mixed.as_deref_mut(), importance: importance.as_deref_mut() })?
    };
    match (mixed, importance) {
        _ if written => Ok(()),
        (Some(out), Some(importance)) => {
            forward_and_importance_into(mixer, out, importance, inp, mask)
        }
        (Some(out), None) => forward_into(mixer, out, inp, mask),
        (None, Some(importance)) => importance_into(mixer, importance, inp, mask),
        (None, None) => Ok(()),
    }
}

/// The outputs of a kernel that writes a whole call on a checked `inp` `(..., F, D)` (see
/// [`kernel_output`]): the mixed features `(..., D)` (`(..., 1, D)` with `keep_dim`) where
/// `mixed`, the importance `(..., F)` where `importance`, into the caller's `buffers` where
/// given; neither may share bytes with `inp`, `mask` or each other. `None` where a buffer does
/// not fit.
pub(crate) fn kernel_outputs(
    inp: &Tensor,
    mask: Option<&Tensor>,
    keep_dim: bool,
    (mixed, importance): (bool, bool),
    buffers: Buffers<'_>,
) -> Result<Option<(Option<Tensor>, Option<Tensor>)>> {
    let shape = kernels::Dims::of(inp);
    let (leading, f, d) =
        (&shape[..shape.len() - 2], shape[shape.len() - 2], shape[shape.len() - 1]);
    let kind = inp.kind();
    let mut reads = Vec::with_capacity(3);
    reads.push(inp);
    reads.extend(mask);
    let mixed = match mixed {
        true => {
            let mut mixed_shape = Vec::with_capacity(leading.len() + 2);
            mixed_shape.extend_from_slice(leading);
            match keep_dim {
                true => mixed_shape.extend_from_slice(&[1, d]),
                false => mixed_shape.push(d),
            }
            match kernel_output(buffers.mixed, &mixed_shape, kind, &reads)? {
                Some(mixed) => Some(mixed),
                None => return Ok(None),
            }
        }
        false => None,
    };
    reads.extend(&mixed);
    let importance = match importance {
        true => {
            let importance_shape = [leading, &[f]].concat();
            match kernel_output(buffers.importance, &importance_shape, kind, &reads)? {
                Some(importance) => Some(importance),
                None => return Ok(None),
            }
        }
        false => None,
    };
    Ok(Some((mixed, importance)))
}

/// Where one output of a kernel that writes a whole call goes: the caller's `buffer` where it
/// is a contiguous CPU tensor of `shape` and `kind` sharing no bytes with the tensors the call
/// reads (`reads`), else a fresh tensor of that shape where there is no buffer. `None` where the
/// buffer does not fit: the call then takes the path that copies into it (and says what was
/// wrong).
pub(crate) fn kernel_output(
    buffer: Option<&mut Tensor>,
    shape: &[i64],
    kind: Kind,
    reads: &[&Tensor],
) -> Result<Option<Tensor>> {
    let Some(buffer) = buffer else {
        return Ok(Some(Tensor::f_empty(shape, (kind, Device::Cpu))?));
    };
    let fits = buffer.defined()
        && *kernels::Dims::of(buffer) == *shape
        && buffer.kind() == kind
        && buffer.device() == Device::Cpu
        && buffer.is_contiguous()
        && !buffer.is_neg()
        && !reads.iter().any(|read| kernels::overlap(buffer, read));
    Ok(fits.then(|| buffer.shallow_clone()))
}

/// Copies each `value` into the caller's `buffer` (`what` naming it in errors), recording
/// nothing for autograd; none is written unless every one passes [`check_buffer`].
fn write_into<const N: usize>(writes: [(&'static str, &mut Tensor, &Tensor); N]) -> Result<()> {
    for (what, buffer, value) in &writes {
        check_buffer(what, buffer, value)?;
    }
    tch::no_grad(|| -> Result<()> {
        for (_, buffer, value) in writes {
            buffer.f_copy_(value)?;
        }
        Ok(())
    })
}

/// Adds `tensor` as a trainable variable `name` under `path`, refusing a name that is taken
/// (tch would silently rename the new one to `name__N`).
pub(crate) fn add_variable(path: &nn::Path, name: &str, tensor: Tensor) -> Result<Tensor> {
    crate::cuda::keep_linked();
    if path.get(name).is_some() {
        return Err(MixError::DuplicateVariable(path.path(name)));
    }
    Ok(path.add(name, tensor, true))
}

/// PyTorch's `nn.Linear` initialisation, in place: `kaiming_uniform_(a=sqrt(5))` on the weight,
/// which is `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, and the same bound for the bias.
/// Zero-element tensors are left alone, as PyTorch does.
pub(crate) fn init_linear(weight: &mut Tensor, bias: Option<&mut Tensor>) -> Result<()> {
    let fan_in = weight.size().get(1).copied().unwrap_or(0);
    let bound = if fan_in > 0 { 1.0 / (fan_in as f64).sqrt() } else { 0.0 };
    tch::no_grad(|| -> Result<()> {
        if weight.numel() > 0 {
            let _ = weight.f_uniform_(-bound, bound)?;
        }
        if let Some(bias) = bias.filter(|b| b.numel() > 0) {
            let _ = bias.f_uniform_(-bound, bound)?;
        }
        Ok(())
    })
}

/// swak's answer to an input without features: the input itself with `keep_dim`, else its sum
/// over the (empty) feature dimension, i.e. zeros of shape `(..., mod_dim)`.
pub(crate) fn without_features(inp: &Tensor, keep_dim: bool) -> Result<Tensor> {
    if keep_dim {
        Ok(inp.shallow_clone())
    } else {
        Ok(inp.f_sum_dim_intlist(-2, false, None::<Kind>)?)
    }
}

/// The tail every swak mixer shares: dropout (training only) on the mixed `(..., 1, mod_dim)`
/// vectors, `+ inp.mean(-2)` with `skip`, then keep or squeeze the feature dimension.
pub(crate) fn finish(
    mixed: Tensor,
    inp: &Tensor,
    dropout: f64,
    skip: bool,
    keep_dim: bool,
    train: bool,
) -> Result<Tensor> {
    let mut out = mixed.f_dropout(dropout, train)?;
    if skip {
        out = out.f_add(&inp.f_mean_dim(-2, true, None::<Kind>)?)?;
    }
    if keep_dim {
        Ok(out)
    } else {
        Ok(out.f_squeeze_dim(-2)?)
    }
}

/// Mixes `inp` `(..., F, D)` with per-feature `weights` (`(..., F)`, or `(F,)` shared by all
/// instances), then applies swak's tail (dropout, skip, keep_dim). Where it is exact (no dropout
/// in play), the skip term is folded into the weights, `w + 1/F`, so the input is read once.
pub(crate) fn mix_weighted(
    weights: &Tensor,
    inp: &Tensor,
    dropout: f64,
    skip: bool,
    keep_dim: bool,
    train: bool,
) -> Result<Tensor> {
    let features = inp.size()[inp.dim() - 2];
    // In half precision `w + 1/F` would round the weights: keep swak's sequence there.
    if mode::is_half(inp.kind()) || (train && dropout > 0.0) || !skip {
        let mixed = weighted_sum(weights, inp, 0.0, true)?;
        return finish(mixed, inp, dropout, skip, keep_dim, train);
    }
    weighted_sum(weights, inp, 1.0 / features as f64, keep_dim)
}

/// `(..., F) x (..., F, D) -> (..., 1, D)` with the weights plus `shift`, weights `(F,)` shared
/// by all instances or one row each; `(..., D)` without `keep_dim`. On the CPU without autograd
/// in one pass over the input (see [`kernels::weighted_sums`]).
fn weighted_sum(weights: &Tensor, inp: &Tensor, shift: f64, keep_dim: bool) -> Result<Tensor> {
    let shape = inp.size();
    let (features, dim) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let rows = match weights.dim() {
        1 => weights.f_unsqueeze(0)?,
        _ => weights.f_reshape([-1, 1, features])?,
    };
    let flat = match shape.len() {
        3 => inp.shallow_clone(),
        _ => inp.f_reshape([-1, features, dim])?,
    };
    let mut out_shape = shape.clone();
    if keep_dim {
        out_shape[shape.len() - 2] = 1;
    } else {
        out_shape.remove(shape.len() - 2);
    }
    if let Some(pooled) =
        kernels::weighted_sums(&rows, &flat, shift, false, &mut Default::default())?
    {
        // `(1, N, D)`: one reshape to the output's shape.
        return Ok(pooled.f_reshape(out_shape)?);
    }
    let weights =
        if shift == 0.0 { weights.shallow_clone() } else { weights.f_add_scalar(shift)? };
    let mixed = weights.f_unsqueeze(-2)?.f_matmul(inp)?;
    Ok(if keep_dim { mixed } else { mixed.f_squeeze_dim(-2)? })
}

/// A boxed mixer in a tch pipeline (`nn::seq_t().add(boxed)`): forward without a mask; like tch's
/// own modules, it panics where the fallible call returns an error.
impl nn::ModuleT for Box<dyn Mixer> {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self.f_forward_t(xs, None, train) {
            Ok(out) => out,
            Err(err) => panic!("{}: {err}", self.spec().name()),
        }
    }
}

/// Implements tch's `nn::ModuleT` for a mixer as a thin wrapper over [`Mixer::f_forward_t`]
/// without a mask; like tch's own modules, it panics where the fallible call returns an error.
macro_rules! impl_module_t {
    ($mixer:ty) => {
        impl tch::nn::ModuleT for $mixer {
            fn forward_t(&self, xs: &tch::Tensor, train: bool) -> tch::Tensor {
                match $crate::Mixer::f_forward_t(self, xs, None, train) {
                    Ok(out) => out,
                    Err(err) => panic!("{}: {err}", stringify!($mixer)),
                }
            }
        }
    };
}
pub(crate) use impl_module_t;
