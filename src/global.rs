//! [`GlobalWeightsMixer`]: one learned set of softmax weights shared by all instances.

use tch::{nn, Device, Kind, Tensor};

use crate::attention::Want;
use crate::error::Result;
use crate::kernels;
use crate::mixer::{self, Mixer};
use crate::mode;
use crate::spec::Spec;

/// Hyper-parameters of a [`GlobalWeightsMixer`], named as in swak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalWeightsConfig {
    /// Dropout on the mixed output in training mode, in `[0, 1)`. Default 0.
    pub dropout: f64,
    /// Add the mean of the features to the mix (a residual connection). Default `true`.
    pub skip: bool,
    /// Keep the feature dimension as size 1 instead of squeezing it. Default `false`.
    pub keep_dim: bool,
}

impl Default for GlobalWeightsConfig {
    fn default() -> Self {
        Self { dropout: 0.0, skip: true, keep_dim: false }
    }
}

/// Combines stacked feature vectors through a learned linear combination whose coefficients,
/// after a softmax, are shared across all instances (swak's `GlobalWeightsMixer`).
///
/// `importance = softmax(coeffs)`, broadcast over the leading dimensions;
/// `forward = dropout(importance @ inp) (+ inp.mean(-2) with skip)`.
///
/// # Shapes
/// - input `(..., n_features, mod_dim)`, any number of leading dimensions;
/// - output `(..., mod_dim)`, or `(..., 1, mod_dim)` with `keep_dim`;
/// - importance `(..., n_features)`.
///
/// Unlike swak, which ignores `mod_dim` here, the input's last dimension is checked against it.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use tch_mix::{GlobalWeightsConfig, GlobalWeightsMixer, Mixer};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let mix = GlobalWeightsMixer::new(&(vs.root() / "mix"), 8, 3, GlobalWeightsConfig::default())?;
/// let inp = Tensor::randn([5, 3, 8], (Kind::Float, Device::Cpu));
/// assert_eq!(mix.f_forward_t(&inp, None, false)?.size(), [5, 8]);
/// assert_eq!(mix.f_importance(&inp, None)?.size(), [5, 3]);
/// # Ok::<(), tch_mix::MixError>(())
/// ```
#[derive(Debug)]
pub struct GlobalWeightsMixer {
    /// The raw mixing coefficients, `(n_features,)`; state-dict key `coeffs`. Ones at init.
    pub coeffs: Tensor,
    mod_dim: i64,
    n_features: i64,
    config: GlobalWeightsConfig,
}

impl GlobalWeightsMixer {
    /// Creates the mixer with its variable `coeffs` under `path`, in the VarStore's dtype and
    /// device.
    ///
    /// # Errors
    /// [`MixError::Config`](crate::MixError::Config) for a `mod_dim` below 1, `n_features` below 0,
    /// or a `dropout` outside `[0, 1)`;
    /// [`MixError::DuplicateVariable`](crate::MixError::DuplicateVariable) where `path` already
    /// holds `coeffs`.
    pub fn new(
        path: &nn::Path,
        mod_dim: i64,
        n_features: i64,
        config: GlobalWeightsConfig,
    ) -> Result<Self> {
        Self::build(path, mod_dim, n_features, config, path.kind(), path.device())
    }

    /// [`Self::new`] in `kind` on `device`.
    pub(crate) fn build(
        path: &nn::Path,
        mod_dim: i64,
        n_features: i64,
        config: GlobalWeightsConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        mixer::check_size("mod_dim", mod_dim, 1)?;
        mixer::check_size("n_features", n_features, 0)?;
        mixer::check_dropout(config.dropout)?;
        let ones = Tensor::f_ones([n_features], (kind, device))?;
        let coeffs = mixer::add_variable(path, "coeffs", ones)?;
        Ok(Self { coeffs, mod_dim, n_features, config })
    }

    /// The number of features mixed, the input's next-to-last dimension.
    pub fn n_features(&self) -> i64 {
        self.n_features
    }

    /// The hyper-parameters.
    pub fn config(&self) -> GlobalWeightsConfig {
        self.config
    }

    fn check(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<()> {
        mixer::check_input(
            inp,
            mask,
            self.mod_dim,
            Some(self.n_features),
            self.kind(),
            self.device(),
        )
    }

    /// The importance, swak's softmax after the broadcast while autograd records (so that the
    /// coefficients' gradient is a sum of one softmax gradient per instance, as PyTorch's is:
    /// the softmax gradient of the summed gradient cancels in larger numbers and was, in
    /// float32, up to 25x further from the float64 truth at batch 64), else the softmax
    /// broadcast.
    fn importance_of(&self, inp: &Tensor) -> Result<Tensor> {
        let shape = inp.size();
        let leading = &shape[..shape.len() - 1];
        if mode::grad_mode() {
            let coeffs = self.coeffs.f_expand(leading, false)?;
            return Ok(coeffs.f_softmax(-1, None::<Kind>)?);
        }
        Ok(self.coeffs.f_softmax(-1, None::<Kind>)?.f_expand(leading, false)?)
    }

    /// An inference call on the kernels ([`kernels::global`]): the mixed features and the
    /// importance as wanted, written into the caller's `buffers` where there are some. `None`
    /// where the kernels do not apply (autograd recording, dropout in training, half
    /// precision, CUDA, a non-contiguous input, no features, an empty batch, a buffer that does
    /// not fit): the caller takes the usual path. `inp` is checked already.
    fn on_kernels(
        &self,
        inp: &Tensor,
        train: bool,
        want: Want,
        buffers: mixer::Buffers<'_>,
    ) -> Result<Option<(Option<Tensor>, Option<Tensor>)>> {
        let GlobalWeightsConfig { dropout, skip, keep_dim } = self.config;
        let (f, d) = (self.n_features, self.mod_dim);
        let elements = kernels::numel(inp);
        let usable = f > 0
            && elements > 0
            && !(train && dropout > 0.0)
            && inp.is_contiguous()
            && !inp.is_neg()
            && kernels::applies(&[inp, &self.coeffs]);
        if !usable {
            return Ok(None);
        }
        // One instance takes the softmax from the kernel; a larger batch from libtorch (one op
        // among many), which the importance of the allocating calls expands (a view). Either way
        // every call on the same batch size gives the same bits.
        let n = elements as i64 / (f * d);
        let softmax = match n {
            1 => None,
            _ => Some(self.coeffs.f_softmax(-1, None::<Kind>)?),
        };
        let rows = want.importance() && (buffers.importance.is_some() || n == 1);
        let wanted = (want.output(), rows);
        let Some((mixed, importance)) =
            mixer::kernel_outputs(inp, None, keep_dim, wanted, buffers)?
        else {
            return Ok(None);
        };
        let shift = if skip { 1.0 / f as f64 } else { 0.0 };
        let (mut mixed, mut importance) = (mixed, importance);
        let (weights, normalise) = match &softmax {
            Some(softmax) => (softmax, false),
            None => (&self.coeffs, true),
        };
        if mixed.is_some() || importance.is_some() {
            let (into_mixed, into_importance) = (mixed.as_mut(), importance.as_mut());
            let shape = (n, f, d);
            kernels::global(inp, shape, weights, normalise, shift, into_mixed, into_importance)?;
        }
        let importance = match (importance, softmax) {
            (None, Some(softmax)) if want.importance() => {
                Some(softmax.f_expand(&inp.size()[..inp.dim() - 1], false)?)
            }
            (importance, _) => importance,
        };
        Ok(Some((mixed, importance)))
    }

    /// [`Self::on_kernels`] for the `_into` calls (see [`mixer::into_buffers`]): `false`
    /// where the kernels do not take the call (nothing is then written).
    fn write_direct(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        buffers: mixer::Buffers<'_>,
    ) -> Result<bool> {
        self.check(inp, mask)?;
        Ok(self.on_kernels(inp, false, buffers.want(), buffers)?.is_some())
    }

    /// The mixed features; `softmax` is the softmax of the coefficients where the caller has it.
    fn mix(&self, inp: &Tensor, train: bool, softmax: Option<&Tensor>) -> Result<Tensor> {
        if self.n_features == 0 {
            return mixer::without_features(inp, self.config.keep_dim);
        }
        let GlobalWeightsConfig { dropout, skip, keep_dim } = self.config;
        let weights = match (mode::grad_mode(), softmax) {
            (true, _) => self.importance_of(inp)?,
            (false, Some(softmax)) => softmax.shallow_clone(),
            (false, None) => self.coeffs.f_softmax(-1, None::<Kind>)?,
        };
        mixer::mix_weighted(&weights, inp, dropout, skip, keep_dim, train)
    }
}

impl Mixer for GlobalWeightsMixer {
    fn mod_dim(&self) -> i64 {
        self.mod_dim
    }

    fn device(&self) -> Device {
        self.coeffs.device()
    }

    fn kind(&self) -> Kind {
        self.coeffs.kind()
    }

    fn skip(&self) -> bool {
        self.config.skip
    }

    fn keep_dim(&self) -> bool {
        self.config.keep_dim
    }

    fn dropout(&self) -> f64 {
        self.config.dropout
    }

    fn f_forward_t(&self, inp: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let _call = kernels::Call::start(inp);
        self.check(inp, mask)?;
        if let Some((mixed, _)) = self.on_kernels(inp, train, Want::Output, Default::default())? {
            return Ok(mixed.expect("asked for"));
        }
        self.mix(inp, train, None)
    }

    fn f_importance(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let _call = kernels::Call::start(inp);
        self.check(inp, mask)?;
        // Above one instance the importance is libtorch's softmax expanded, kernels or not.
        if inp.numel() as i64 == self.n_features * self.mod_dim {
            let want = Want::Importance;
            if let Some((_, importance)) = self.on_kernels(inp, false, want, Default::default())? {
                return Ok(importance.expect("asked for"));
            }
        }
        self.importance_of(inp)
    }

    fn f_forward_and_importance_t(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let _call = kernels::Call::start(inp);
        self.check(inp, mask)?;
        if let Some((mixed, importance)) =
            self.on_kernels(inp, train, Want::Both, Default::default())?
        {
            return Ok((mixed.expect("asked for"), importance.expect("asked for")));
        }
        if mode::grad_mode() {
            return Ok((self.mix(inp, train, None)?, self.importance_of(inp)?));
        }
        // One softmax for both.
        let softmax = self.coeffs.f_softmax(-1, None::<Kind>)?;
        let leading = &inp.size()[..inp.dim() - 1];
        Ok((self.mix(inp, train, Some(&softmax))?, softmax.f_expand(leading, false)?))
    }

    fn f_forward_into(&self, out: &mut Tensor, inp: &Tensor, mask: Option<&Tensor>) -> Result<()> {
        let direct = |buffers: mixer::Buffers<'_>| self.write_direct(inp, mask, buffers);
        mixer::into_buffers(self, inp, mask, Some(out), None, direct)
    }

    fn f_importance_into(
        &self,
        importance: &mut Tensor,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        let direct = |buffers: mixer::Buffers<'_>| self.write_direct(inp, mask, buffers);
        mixer::into_buffers(self, inp, mask, None, Some(importance), direct)
    }

    fn f_forward_and_importance_into(
        &self,
        out: &mut Tensor,
        importance: &mut Tensor,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<()> {
        let direct = |buffers: mixer::Buffers<'_>| self.write_direct(inp, mask, buffers);
        mixer::into_buffers(self, inp, mask, Some(out), Some(importance), direct)
    }

    fn reset_parameters(&mut self) -> Result<()> {
        let _ = tch::no_grad(|| self.coeffs.f_fill_(1.0))?;
        Ok(())
    }

    fn variables(&self) -> Vec<(&'static str, Tensor)> {
        vec![("coeffs", self.coeffs.shallow_clone())]
    }

    fn spec(&self) -> Spec {
        Spec::Global { mod_dim: self.mod_dim, n_features: self.n_features, config: self.config }
    }

    fn fresh(&self, path: &nn::Path) -> Result<Self> {
        Self::build(path, self.mod_dim, self.n_features, self.config, self.kind(), self.device())
    }
}

mixer::impl_module_t!(GlobalWeightsMixer);
