//! [`CrossAttentionMixer`]: the features are pooled by attention from one learned query.

use crate::attention::{attention_mixer, Pooling};

attention_mixer! {
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
    CrossAttentionMixer,
    Pooling::Cross
}
