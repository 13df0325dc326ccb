//! [`CrossAttentionMixer`]: the features are pooled by attention from one learned query.
//!
//! What is cross-attention's own: the query is a constant, `ones(1, D)`, so its projection
//! folds into the key projection. Per head, `q_h . (W_k,h x + b_k,h) = u_h . x + c_h` with the
//! key vector `u_h = W_k,h^T q_h` and `q = W_q 1 + b_q`; `c_h` is the same for every feature
//! and cancels in the softmax. The scores are then one dot product per head and feature.
//!
//! Where an input holds infinities, the fold and PyTorch part ways (PyTorch's keys hold
//! infinities of both signs, whose sum is NaN; the fold meets a single infinity), so such a
//! call takes PyTorch's op sequence.

use tch::{Device, Kind, Tensor};

use crate::attention::{self, Attend, AttentionConfig, AttentionCore, Derived, KeyWeights, Packed};
use crate::error::Result;
use crate::kernels::{self, Scratch};
use crate::spec::Spec;
use crate::MultiheadAttention;

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

impl Attend for CrossAttentionMixer {
    fn spec(mod_dim: i64, config: AttentionConfig) -> Spec {
        Spec::Cross { mod_dim, config }
    }

    const CHUNK_WIDTH: i64 = 1;

    const PROJECTS_QUERIES_KEYS: bool = false;

    fn query(n: i64, d: i64, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        Ok(Some(Tensor::f_ones([1, d], (kind, device))?.f_expand([n, 1, d], false)?))
    }

    /// The key vectors `u_h`, scaled by `1 / sqrt(D / H)`: `(H, D)`.
    fn derive(attention: &MultiheadAttention) -> Result<Option<Tensor>> {
        let (d, h) = (attention.embed_dim(), attention.n_heads());
        let w_k = attention.in_proj_weight.f_narrow(0, d, d)?.f_view([h, d / h, d])?;
        let u = query(attention)?.f_bmm(&w_k)?.f_view([h, d])?;
        Ok(Some(u.f_mul_scalar(scale(attention))?))
    }

    fn head_weights(
        attention: &MultiheadAttention,
        derived: &Derived,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        if inp.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            return Ok(None); // the folded scores differ from PyTorch's on infinities
        }
        let (n, f, d) = inp.size3()?;
        // (N, F, H); a transposed view of `(H, D)`, the layout MKL takes fastest.
        let mut scores = inp.f_matmul(&key_vectors(derived).f_transpose(0, 1)?)?;
        if let Some(bias) = &attention.in_proj_bias {
            // The key bias's share of the scores, `c_h = q_h . b_k,h`, is the same for every
            // feature and cancels in the softmax; it is added all the same, so that the key
            // bias has the gradient PyTorch gives it (zero, or NaN where the scores are).
            let h = attention.n_heads();
            let b_k = bias.f_narrow(0, d, d)?.f_view([h, d / h, 1])?;
            let shift =
                query(attention)?.f_bmm(&b_k)?.f_view([h])?.f_mul_scalar(scale(attention))?;
            scores = scores.f_add(&shift)?;
        }
        attention::masked_softmax(scores.f_transpose(1, 2)?, mask, &[n, 1, f]).map(Some)
    }

    fn per_key(weights: Tensor) -> Result<Tensor> {
        Ok(weights)
    }

    fn kernel(
        _: &MultiheadAttention,
        derived: &Derived,
        _: Option<&Packed>,
        inp: &Tensor,
        mask: Option<&Tensor>,
        output: bool,
        scratch: &mut Scratch,
    ) -> Result<Option<KeyWeights>> {
        let Some(cross) = kernels::cross(inp, key_vectors(derived), mask, output, scratch)? else {
            return Ok(None);
        };
        // The folded scores differ from PyTorch's where an input holds infinities: PyTorch
        // sums infinite key components of both signs (NaN), the fold meets one infinity.
        Ok(cross.finite_scores.then_some((cross.weights, cross.pooled)))
    }

    /// Scores and pooling per head, then the value and output projections.
    fn small_work(f: usize, d: usize, h: usize) -> Option<usize> {
        Some(f * d * (2 * h + 1) + 2 * d * d)
    }

    fn small(
        _: &MultiheadAttention,
        derived: &Derived,
        inp: &Tensor,
        shape: (i64, i64, i64),
        mask: Option<&Tensor>,
        skip: bool,
        outputs: kernels::CrossOutputs<'_>,
    ) -> Result<bool> {
        let Some(packed) = &derived.packed else { return Ok(false) };
        let weights = kernels::CrossWeights {
            keys: key_vectors(derived),
            value: &packed.value,
            out: &packed.out,
        };
        kernels::cross_small(inp, shape, mask, weights, skip, outputs)
    }
}

/// The projected constant query per head, `q = W_q 1 + b_q` as `(H, 1, D / H)`.
fn query(attention: &MultiheadAttention) -> Result<Tensor> {
    let (d, h) = (attention.embed_dim(), attention.n_heads());
    let weight = &attention.in_proj_weight;
    let mut q = weight.f_narrow(0, 0, d)?.f_sum_dim_intlist(1, false, None::<Kind>)?;
    if let Some(bias) = &attention.in_proj_bias {
        q = q.f_add(&bias.f_narrow(0, 0, d)?)?;
    }
    Ok(q.f_view([h, 1, d / h])?)
}

/// The scale of the scores, `1 / sqrt(D / H)`.
fn scale(attention: &MultiheadAttention) -> f64 {
    1.0 / ((attention.embed_dim() / attention.n_heads()) as f64).sqrt()
}

/// The key vectors that [`CrossAttentionMixer::derive`] put into `derived`.
fn key_vectors(derived: &Derived) -> &Tensor {
    derived.scoring.as_ref().expect("cross-attention derives its key vectors")
}

attention::impl_attention_mixer!(CrossAttentionMixer);
