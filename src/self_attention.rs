//! [`SelfAttentionMixer`]: every feature attends to all, and the attended features are averaged.

use crate::attention::{attention_mixer, Pooling};

attention_mixer! {
    /// Combines stacked feature vectors via multi-head self-attention pooling (swak's
    /// `SelfAttentionMixer`): each feature attends to all, and the attended representations are
    /// averaged over the features.
    ///
    /// `importance` = the attention weights averaged over heads and over query positions;
    /// `forward = dropout(mean_queries(attention(inp, inp, inp))) (+ inp.mean(-2) with skip)`.
    ///
    /// # Shapes
    /// - input `(..., n_features, mod_dim)` with any number of features and leading dimensions
    ///   (swak takes 2-D and 3-D only; 4-D and more are treated as a flattened batch);
    /// - mask `(..., n_features)`: bool (`true` = ignore the feature) or float (added to the scores);
    /// - output `(..., mod_dim)`, or `(..., 1, mod_dim)` with `keep_dim`;
    /// - importance `(..., n_features)`.
    ///
    /// A fully masked row has all-zero importance and a zero attention output (so its output is
    /// `out_proj.bias` plus the skip term). swak gives NaN importance there, and NaN output in eval
    /// mode without autograd, where PyTorch takes its fast path.
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// use tch_mix::{AttentionConfig, Mixer, SelfAttentionMixer};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let mix = SelfAttentionMixer::new(&(vs.root() / "mix"), 8, AttentionConfig::default())?;
    /// let inp = Tensor::randn([2, 5, 3, 8], (Kind::Float, Device::Cpu));
    /// assert_eq!(mix.f_forward_t(&inp, None, false)?.size(), [2, 5, 8]);
    /// assert_eq!(mix.f_importance(&inp, None)?.size(), [2, 5, 3]);
    /// # Ok::<(), tch_mix::MixError>(())
    /// ```
    SelfAttentionMixer,
    Pooling::SelfMean
}
