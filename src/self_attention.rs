//! [`SelfAttentionMixer`]: every feature attends to all, and the attended features are averaged.
//!
//! What is self-attention's own: its queries and keys, `(N, F, 2 D)`, the one projection it
//! cannot avoid; the `F x F` scores of every query against every key; and the mean over the
//! queries, which turns them into one weight per head and key.

use tch::{Device, Kind, Tensor};

use crate::attention::{
    self, Attend, AttentionConfig, AttentionCore, Derived, KeyWeights, Packed, LARGE_BATCH,
};
use crate::error::Result;
use crate::kernels::{self, Scratch};
use crate::spec::Spec;
use crate::MultiheadAttention;

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
#[derive(Debug)]
pub struct SelfAttentionMixer {
    core: AttentionCore,
}

impl Attend for SelfAttentionMixer {
    fn spec(mod_dim: i64, config: AttentionConfig) -> Spec {
        Spec::SelfAttention { mod_dim, config }
    }

    // Chunks keep their queries and keys, `(n, F, 2 D)`, at half the chunk bytes, so that they
    // stay in the cache until the weights kernel reads them.
    const CHUNK_WIDTH: i64 = 4;

    const PROJECTS_QUERIES_KEYS: bool = true;

    fn query(_: i64, _: i64, _: Kind, _: Device) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn derive(_: &MultiheadAttention) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// `(N, H, F, F)`: queries x keys.
    fn head_weights(
        attention: &MultiheadAttention,
        _: &Derived,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let (n, f, d) = inp.size3()?;
        let h = attention.n_heads();
        let hd = d / h;
        let qk = queries_keys(attention, inp, None)?;
        let q = qk.f_narrow(-1, 0, d)?.f_view([n, f, h, hd])?.f_transpose(1, 2)?;
        let k = qk.f_narrow(-1, d, d)?.f_view([n, f, h, hd])?.f_permute([0, 2, 3, 1])?;
        let scores = q.f_mul_scalar(1.0 / (hd as f64).sqrt())?.f_matmul(&k)?;
        if scores.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
            // An infinite input (or an overflowing score) can leave a query nothing but -inf
            // scores: PyTorch's attention gives that row zero weights (its importance, a plain
            // softmax, NaN), which reaches the value weights' gradients; its op sequence decides.
            return Ok(None);
        }
        attention::masked_softmax(scores, mask, &[n, 1, 1, f]).map(Some)
    }

    /// The mean over the queries.
    fn per_key(weights: Tensor) -> Result<Tensor> {
        Ok(weights.f_mean_dim(2, false, None::<Kind>)?)
    }

    fn kernel(
        attention: &MultiheadAttention,
        _: &Derived,
        packed: Option<&Packed>,
        inp: &Tensor,
        mask: Option<&Tensor>,
        output: bool,
        scratch: &mut Scratch,
    ) -> Result<Option<KeyWeights>> {
        let (n, f, d) = inp.size3()?;
        let h = attention.n_heads();
        let scale = 1.0 / ((d / h) as f64).sqrt();
        let large = n >= LARGE_BATCH;
        let packed = packed.and_then(|packed| packed.queries_keys.as_ref());
        let projected = match packed {
            Some(packed) => kernels::linear(&inp.f_reshape([n * f, d])?, packed, d, None)?,
            None => None,
        };
        let qk = match projected {
            Some(qk) => qk.f_view([n, f, 2 * d])?,
            None => queries_keys(attention, inp, large.then_some(&mut *scratch))?,
        };
        let Some(weights) = kernels::self_weights(&qk, h, scale, mask, scratch)? else {
            return Ok(None);
        };
        let pooled = match output {
            true => kernels::weighted_sums(&weights, inp, 0.0, true, scratch)?,
            false => None,
        };
        Ok(Some((weights, pooled)))
    }
}

/// The queries and keys, `(N, F, 2 D)`. With `scratch` (inference only), into its reused buffer.
fn queries_keys(
    attention: &MultiheadAttention,
    inp: &Tensor,
    scratch: Option<&mut Scratch>,
) -> Result<Tensor> {
    let d = attention.embed_dim();
    let w_qk = attention.in_proj_weight.f_narrow(0, 0, 2 * d)?;
    let b_qk = match &attention.in_proj_bias {
        Some(bias) => Some(bias.f_narrow(0, 0, 2 * d)?),
        None => None,
    };
    let Some(scratch) = scratch else {
        return Ok(inp.f_linear(&w_qk, b_qk.as_ref())?);
    };
    let (n, f, _) = inp.size3()?;
    let qk = scratch.take("queries and keys", &[n, f, 2 * d], inp.kind())?;
    let (flat, out) = (inp.f_reshape([n * f, d])?, qk.f_view([n * f, 2 * d])?);
    // A bias (zero without one) fills the output for the GEMM to add to: MKL's `beta = 0`
    // path would clear it in a slower pass of its own.
    let b_qk = match b_qk {
        Some(b_qk) => b_qk,
        None => Tensor::f_zeros([2 * d], (inp.kind(), inp.device()))?,
    };
    let _ = b_qk.f_addmm_out(&out, &flat, &w_qk.f_transpose(0, 1)?)?;
    Ok(qk)
}

attention::impl_attention_mixer!(SelfAttentionMixer);
