//! [`InstanceWeightsMixer`]: per-instance softmax weights from a linear projection of all features.

use tch::{nn, Device, Kind, Tensor};

use crate::attention::Want;
use crate::error::Result;
use crate::kernels;
use crate::mixer::{self, Mixer};
use crate::spec::Spec;

/// Hyper-parameters of an [`InstanceWeightsMixer`], named as in swak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceWeightsConfig {
    /// Learn a bias in the projection. Default `true`.
    pub bias: bool,
    /// Dropout on the mixed output in training mode, in `[0, 1)`. Default 0.
    pub dropout: f64,
    /// Add the mean of the features to the mix (a residual connection). Default `true`.
    pub skip: bool,
    /// Keep the feature dimension as size 1 instead of squeezing it. Default `false`.
    pub keep_dim: bool,
}

impl Default for InstanceWeightsConfig {
    fn default() -> Self {
        Self { bias: true, dropout: 0.0, skip: true, keep_dim: false }
    }
}

/// Combines stacked feature vectors by a per-instance linear combination (swak's
/// `InstanceWeightsMixer`): all features are concatenated, projected by a `Linear` layer down to
/// one score per feature, and turned into weights by a softmax.
///
/// `importance = softmax(project(inp.flatten(-2)))`;
/// `forward = dropout(importance @ inp) (+ inp.mean(-2) with skip)`.
///
/// # Shapes
/// - input `(..., n_features, mod_dim)`, any number of leading dimensions;
/// - output `(..., mod_dim)`, or `(..., 1, mod_dim)` with `keep_dim`;
/// - importance `(..., n_features)`.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use tch_mix::{InstanceWeightsConfig, InstanceWeightsMixer, Mixer};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let config = InstanceWeightsConfig { skip: false, ..Default::default() };
/// let mix = InstanceWeightsMixer::new(&(vs.root() / "mix"), 8, 3, config)?;
/// let inp = Tensor::randn([5, 3, 8], (Kind::Float, Device::Cpu));
/// assert_eq!(mix.f_forward_t(&inp, None, false)?.size(), [5, 8]);
/// # Ok::<(), tch_mix::MixError>(())
/// ```
#[derive(Debug)]
pub struct InstanceWeightsMixer {
    /// Projection weight, `(n_features, n_features * mod_dim)`; key `project.weight`.
    pub weight: Tensor,
    /// Projection bias, `(n_features,)`; key `project.bias`. `None` without `bias`.
    pub bias: Option<Tensor>,
    mod_dim: i64,
    n_features: i64,
    config: InstanceWeightsConfig,
}

impl InstanceWeightsMixer {
    /// Creates the mixer with its variables `project.weight` (and `project.bias`) under `path`,
    /// in the VarStore's dtype and device, initialised like PyTorch's `nn.Linear`.
    ///
    /// # Errors
    /// [`MixError::Config`](crate::MixError::Config) for a `mod_dim` below 1, `n_features` below 0,
    /// sizes whose product overflows, or a `dropout` outside `[0, 1)`;
    /// [`MixError::DuplicateVariable`](crate::MixError::DuplicateVariable) where `path` already
    /// holds the variables.
    pub fn new(
        path: &nn::Path,
        mod_dim: i64,
        n_features: i64,
        config: InstanceWeightsConfig,
    ) -> Result<Self> {
        Self::build(path, mod_dim, n_features, config, path.kind(), path.device())
    }

    /// [`Self::new`] in `kind` on `device`.
    pub(crate) fn build(
        path: &nn::Path,
        mod_dim: i64,
        n_features: i64,
        config: InstanceWeightsConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        mixer::check_size("mod_dim", mod_dim, 1)?;
        mixer::check_size("n_features", n_features, 0)?;
        mixer::check_dropout(config.dropout)?;
        let project = path / "project";
        let options = (kind, device);
        let flat = mixer::checked_product("n_features * mod_dim", &[n_features, mod_dim])?;
        let weight = Tensor::f_empty([n_features, flat], options)?;
        let weight = mixer::add_variable(&project, "weight", weight)?;
        let bias = match config.bias {
            true => Some(mixer::add_variable(
                &project,
                "bias",
                Tensor::f_empty([n_features], options)?,
            )?),
            false => None,
        };
        let mut mix = Self { weight, bias, mod_dim, n_features, config };
        mix.reset_parameters()?;
        Ok(mix)
    }

    /// The number of features mixed, the input's next-to-last dimension.
    pub fn n_features(&self) -> i64 {
        self.n_features
    }

    /// The hyper-parameters.
    pub fn config(&self) -> InstanceWeightsConfig {
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

    /// Inference on the CPU in one pass over the input (see `kernels::instance`): the mixed
    /// features and the importance as wanted, written into the caller's `buffers` where there
    /// are some. `None` where the kernel does not apply (autograd recording, dropout in
    /// training, half precision, CUDA, no features, a buffer that does not fit): the caller
    /// takes the usual path. `inp` is checked already.
    fn one_pass(
        &self,
        inp: &Tensor,
        train: bool,
        want: Want,
        buffers: mixer::Buffers<'_>,
    ) -> Result<Option<(Option<Tensor>, Option<Tensor>)>> {
        let InstanceWeightsConfig { dropout, skip, keep_dim, .. } = self.config;
        let (f, d) = (self.n_features, self.mod_dim);
        let dropped = train && dropout > 0.0 && want.output();
        if f == 0 || dropped || !kernels::applies(&[inp, &self.weight]) {
            return Ok(None);
        }
        let wanted = (want.output(), want.importance());
        let outputs = mixer::kernel_outputs(inp, None, keep_dim, wanted, buffers)?;
        let Some((mut mixed, mut importance)) = outputs else {
            return Ok(None);
        };
        let n = kernels::numel(inp) as i64 / (f * d).max(1);
        let (weight, bias) = (&self.weight, self.bias.as_ref());
        let fold = skip && want.output();
        let (into, importance_into) = (mixed.as_mut(), importance.as_mut());
        if !kernels::instance(inp, (n, f, d), weight, bias, fold, into, importance_into)? {
            return Ok(None);
        }
        Ok(Some((mixed, importance)))
    }

    /// [`Self::one_pass`] for the `_into` calls (see [`mixer::into_buffers`]): `false` where
    /// the kernel does not take the call (nothing is then written).
    fn write_direct(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        buffers: mixer::Buffers<'_>,
    ) -> Result<bool> {
        self.check(inp, mask)?;
        Ok(self.one_pass(inp, false, buffers.want(), buffers)?.is_some())
    }

    /// The mixed features and the importance along libtorch's ops, for what the kernel does not
    /// take (autograd, dropout in training, half precision, CUDA).
    fn mix(&self, inp: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let InstanceWeightsConfig { dropout, skip, keep_dim, .. } = self.config;
        let weights = self.weights(inp)?;
        if self.n_features == 0 {
            return Ok((mixer::without_features(inp, keep_dim)?, weights));
        }
        let mixed = mixer::mix_weighted(&weights, inp, dropout, skip, keep_dim, train)?;
        Ok((mixed, weights))
    }

    fn weights(&self, inp: &Tensor) -> Result<Tensor> {
        let scores = inp.f_flatten(-2, -1)?.f_linear(&self.weight, self.bias.as_ref())?;
        Ok(scores.f_softmax(-1, None::<Kind>)?)
    }
}

impl Mixer for InstanceWeightsMixer {
    fn mod_dim(&self) -> i64 {
        self.mod_dim
    }

    fn device(&self) -> Device {
        self.weight.device()
    }

    fn kind(&self) -> Kind {
        self.weight.kind()
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
        if let Some((mixed, _)) = self.one_pass(inp, train, Want::Output, Default::default())? {
            return Ok(mixed.expect("asked for"));
        }
        Ok(self.mix(inp, train)?.0)
    }

    fn f_importance(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let _call = kernels::Call::start(inp);
        self.check(inp, mask)?;
        // The one-pass kernel beats libtorch's skinny GEMM even with the pooling it adds.
        let want = Want::Importance;
        if let Some((_, importance)) = self.one_pass(inp, false, want, Default::default())? {
            return Ok(importance.expect("asked for"));
        }
        self.weights(inp)
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
            self.one_pass(inp, train, Want::Both, Default::default())?
        {
            return Ok((mixed.expect("asked for"), importance.expect("asked for")));
        }
        self.mix(inp, train)
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
        mixer::init_linear(&mut self.weight, self.bias.as_mut())
    }

    fn variables(&self) -> Vec<(&'static str, Tensor)> {
        let mut variables = vec![("project.weight", self.weight.shallow_clone())];
        if let Some(bias) = &self.bias {
            variables.push(("project.bias", bias.shallow_clone()));
        }
        variables
    }

    fn spec(&self) -> Spec {
        Spec::Instance { mod_dim: self.mod_dim, n_features: self.n_features, config: self.config }
    }

    fn fresh(&self, path: &nn::Path) -> Result<Self> {
        Self::build(path, self.mod_dim, self.n_features, self.config, self.kind(), self.device())
    }
}

mixer::impl_module_t!(InstanceWeightsMixer);
