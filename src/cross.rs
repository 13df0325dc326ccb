//! [`CrossAttentionMixer`]: the features are pooled by attention from one learned query.

use tch::{nn, Device, Kind, Tensor};

use crate::attention::{AttentionConfig, AttentionCore, Pooling};
use crate::error::Result;
use crate::mixer::{self, Mixer};

/// Combines stacked feature vectors via cross-attention with a learned query (swak's
/// `CrossAttentionMixer`): a constant query `ones(1, D)`, projected by the learned query
/// projection, attends over the features.
///
/// `importance` = the query's attention weights over the features (averaged over heads);
/// `forward = dropout(attention(query, inp, inp)) (+ inp.mean(-2) with skip)`.
///
/// # Shapes
/// - input `(..., n_features, mod_dim)` with any number of features and leading dimensions
///   (swak takes 2-D and 3-D only; 4-D and more are treated as a flattened batch);
/// - mask `(..., n_features)`: bool (`true` = ignore the feature) or float (added to the scores);
/// - output `(..., mod_dim)`, or `(..., 1, mod_dim)` with `keep_dim`;
/// - importance `(..., n_features)`.
///
/// A fully masked row has all-zero importance and a zero attention output (so its output is
/// `out_proj.bias` plus the skip term), where swak gives NaN importance.
///
/// ```
/// use tch::{nn, Device, Kind, Tensor};
/// use tch_mix::{AttentionConfig, CrossAttentionMixer, Mixer};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let config = AttentionConfig { n_heads: 2, ..Default::default() };
/// let mix = CrossAttentionMixer::new(&(vs.root() / "mix"), 8, config)?;
/// let inp = Tensor::randn([5, 3, 8], (Kind::Float, Device::Cpu));
/// let mask = Tensor::from_slice(&[false, false, true]).expand([5, 3], false);
/// assert_eq!(mix.f_forward_t(&inp, Some(&mask), false)?.size(), [5, 8]);
/// assert_eq!(mix.f_importance(&inp, Some(&mask))?.size(), [5, 3]);
/// # Ok::<(), tch_mix::MixError>(())
/// ```
#[derive(Debug)]
pub struct CrossAttentionMixer {
    core: AttentionCore,
}

impl CrossAttentionMixer {
    /// Creates the mixer with its variables `attention.in_proj_weight`, `attention.in_proj_bias`,
    /// `attention.out_proj.weight` and `attention.out_proj.bias` under `path`, in the VarStore's
    /// dtype and device, initialised like PyTorch's `nn.MultiheadAttention`.
    pub fn new(path: &nn::Path, mod_dim: i64, config: AttentionConfig) -> Result<Self> {
        Ok(Self { core: AttentionCore::new(path, mod_dim, config, path.kind(), path.device())? })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> AttentionConfig {
        self.core.config
    }

    /// The attention module (its tensors are public).
    pub fn attention(&self) -> &crate::MultiheadAttention {
        &self.core.attention
    }
}

impl Mixer for CrossAttentionMixer {
    fn mod_dim(&self) -> i64 {
        self.core.mod_dim
    }

    fn device(&self) -> Device {
        self.core.device()
    }

    fn kind(&self) -> Kind {
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

    fn f_forward_t(&self, inp: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let (mixed, _) = self.core.mix(Pooling::Cross, inp, mask, train, true, false)?;
        Ok(mixed.expect("asked for"))
    }

    fn f_importance(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (_, importance) = self.core.mix(Pooling::Cross, inp, mask, false, false, true)?;
        Ok(importance.expect("asked for"))
    }

    fn f_forward_and_importance_t(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (mixed, importance) = self.core.mix(Pooling::Cross, inp, mask, train, true, true)?;
        Ok((mixed.expect("asked for"), importance.expect("asked for")))
    }

    fn reset_parameters(&mut self) -> Result<()> {
        self.core.attention.reset_parameters()
    }

    fn variables(&self) -> Vec<(&'static str, Tensor)> {
        self.core.variables()
    }

    fn fresh(&self, path: &nn::Path) -> Result<Self> {
        let core = AttentionCore::new(
            path,
            self.core.mod_dim,
            self.core.config,
            self.kind(),
            self.device(),
        )?;
        Ok(Self { core })
    }
}

mixer::impl_module_t!(CrossAttentionMixer);
