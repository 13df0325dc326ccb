//! The pooled fast path of the attention mixers: attention pooling computed along the shortest
//! path, never forming the `(N, F, 3 D)` projection.
//!
//! The value path is linear, so the inputs are pooled with the attention weights first and
//! projected afterwards, once per instance instead of once per feature:
//! `mean_i sum_j a_ij (W_v x_j + b_v) = W_v (sum_j b_j x_j) + (sum_j b_j) b_v` with
//! `b_j = mean_i a_ij`. How the weights `a_ij` arise is the mixer's ([`Attend`]). Dropout drops
//! attention weights as PyTorch does, and the bias term keeps the sum of the dropped weights; a
//! fully masked row pools nothing and gives `out_proj.bias`.
//!
//! Inference (no autograd, no dropout) on the CPU takes the one-pass kernels; large batches go
//! in chunks that stay in the cache, with buffers reused from chunk to chunk; the tensors
//! derived from the weights are cached between calls until a weight changes. Half precision
//! pools in f32.

use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use super::core::{Attend, Want};
use super::multihead::MultiheadAttention;
use crate::error::Result;
use crate::kernels::{self, Scratch};
use crate::mode;

/// Instances from which inference projects into reused buffers and runs the value projection
/// as one GEMM per head; smaller batches take fewer, allocating ops.
pub(crate) const LARGE_BATCH: i64 = 256;

/// Input bytes per chunk of a large inference batch (about half a last-level cache).
const CHUNK_BYTES: i64 = 16 << 20;

/// What one pooled call computes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    /// The mixed vectors, the importance, or both.
    pub(crate) want: Want,
    /// Whether the mixed vectors include the mean of the inputs over the features.
    pub(crate) skip: bool,
    /// Dropout on the attention weights (0 in eval mode).
    pub(crate) dropout: f64,
}

/// What a pooled call returns; each part only where it was asked for.
#[derive(Debug)]
pub(crate) struct Mixed {
    /// The mixed vectors `(N, D)`: the attention output (averaged over queries), plus the mean
    /// of the inputs over the features where `skip` was asked for.
    pub(crate) mixed: Option<Tensor>,
    /// The importance `(N, F)`: attention weights averaged over heads (and queries).
    pub(crate) importance: Option<Tensor>,
}

/// The heads' output before the output projection.
struct Heads {
    /// The heads' concatenated output `(N, D)`.
    heads: Option<Tensor>,
    /// As [`Mixed::importance`].
    importance: Option<Tensor>,
    /// The mean of the inputs over the features `(N, D)`, where the kernels pooled it.
    mean: Option<Tensor>,
    /// The packed output projection, where the heads' output came from packed weights too.
    packed_out: Option<Tensor>,
}

/// Per-head weights of each key and, where the kernels pooled them, the pooled inputs and
/// their mean `(H + 1, N, D)`.
pub(crate) type KeyWeights = (Tensor, Option<Tensor>);

/// Tensors derived from the input projection, with the key that tells whether they are still
/// current: each weight's storage, version counter and dtype, which change with every write.
#[derive(Debug)]
pub(crate) struct Derived {
    key: DerivedKey,
    /// What the mixer's scores need ([`Attend::derive`]): cross-attention's key vectors.
    pub(crate) scoring: Option<Tensor>,
    /// The value projection per head: `(H, hd, D)`.
    value_weights: Tensor,
    /// The value bias per head: `(1, H, hd)`.
    value_bias: Option<Tensor>,
    /// The projections packed for small inference batches, once one asked for them.
    pub(crate) packed: Option<Packed>,
}

// SAFETY: `Tensor` is not `Sync` because libtorch's tensors can be written through any handle.
// A `Derived` is shared (behind an `Arc`, by the cache and the calls that use it) only once it
// is built, and nothing writes through its tensors: its users get `&Derived` only and read
// them (as inputs of libtorch ops, or as shared slices in the CPU kernels), and reading one
// libtorch tensor from several threads is safe (sizes, strides, dtype and data pointer are
// fixed, reference counts atomic). Some of its tensors are views of the weights (the value
// projection's rows): the weights are written only by their owner, and never while another
// thread runs the mixer, since a mixer is not `Sync` and the one way to share it, a
// `SharedMixer`, never writes its weights. A write makes a new `Derived` (the key changes)
// rather than changing the old one.
#[allow(unsafe_code)]
unsafe impl Sync for Derived {}

/// Storage, version counter and dtype of the input projection's weight and bias and the output
/// projection's weight and bias, in that order (`None` for a missing bias).
type DerivedKey = [Option<(usize, i64, Kind)>; 4];

/// The projections packed for `kernels::linear`, which small inference batches (below
/// [`LARGE_BATCH`]) take instead of MKL, whose per-call packing of the weights costs there as
/// much as the product.
#[derive(Debug)]
pub(crate) struct Packed {
    /// The query and key projections, two blocks of `D` columns, where the mixer projects its
    /// inputs into queries and keys ([`Attend::PROJECTS_QUERIES_KEYS`]).
    pub(crate) queries_keys: Option<Tensor>,
    /// The value projection with its bias, one block of `D / H` columns per head.
    pub(crate) value: Tensor,
    /// The output projection with its bias, one block of `D` columns.
    pub(crate) out: Tensor,
}

impl Packed {
    /// Packs the projections of `attention`.
    fn new<A: Attend>(attention: &MultiheadAttention) -> Result<Self> {
        let _no_grad = tch::no_grad_guard();
        let d = attention.embed_dim;
        let (h, hd) = (attention.n_heads, d / attention.n_heads);
        let (w, b) = (&attention.in_proj_weight, attention.in_proj_bias.as_ref());
        let queries_keys = match A::PROJECTS_QUERIES_KEYS {
            true => {
                let w = w.f_narrow(0, 0, 2 * d)?.f_reshape([2, d, d])?;
                let b = b.map(|b| b.f_narrow(0, 0, 2 * d)?.f_reshape([2, d])).transpose()?;
                Some(kernels::pack(&w, b.as_ref())?)
            }
            false => None,
        };
        let w_v = w.f_narrow(0, 2 * d, d)?.f_reshape([h, hd, d])?;
        let b_v = b.map(|b| b.f_narrow(0, 2 * d, d)?.f_reshape([h, hd])).transpose()?;
        let w_o = attention.out_proj_weight.f_reshape([1, d, d])?;
        Ok(Self {
            queries_keys,
            value: kernels::pack(&w_v, b_v.as_ref())?,
            out: kernels::pack(&w_o, attention.out_proj_bias.as_ref())?,
        })
    }
}

/// The derived tensors of the last inference call, shared with the calls that use them.
pub(crate) type DerivedCache = Mutex<Option<Arc<Derived>>>;

impl MultiheadAttention {
    /// Attention pooling as the mixers need it (see the module docs).
    ///
    /// Equal to [`MultiheadAttention::output`] (averaged over queries) and
    /// [`MultiheadAttention::weights`] up to rounding; the tests hold it to them.
    ///
    /// `None` where the mixer's fast scores cannot reproduce PyTorch's on this input (see
    /// [`Attend::kernel`]): the caller takes PyTorch's op sequence instead.
    ///
    /// # Shapes
    /// `inp`: `(N, F, D)`, `mask`: additive `(N, F)`; returns the mixed `(N, D)` and the
    /// importance `(N, F)`, as requested.
    pub(crate) fn pooled<A: Attend>(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        request: Request,
    ) -> Result<Option<Mixed>> {
        let kind = inp.kind();
        let (n, f, d) = inp.size3()?;
        let row_bytes = f * d * A::CHUNK_WIDTH * kind.elt_size_in_bytes() as i64;
        let chunk = (CHUNK_BYTES / row_bytes.max(1)).max(1);
        let kernels = kernels::applies(&[inp, &self.in_proj_weight]);
        if n <= chunk || request.dropout != 0.0 || !kernels {
            return self.pooled_chunk::<A>(inp, mask, request, None, &mut Default::default());
        }
        // Large inference batches go in chunks that stay in the cache from the scores to the
        // pooling, and whose buffers the allocator reuses instead of mapping new pages. The
        // chunks write their mixed vectors straight into the rows of the result.
        let mixed = match request.want.output() {
            true => Some(Tensor::f_empty([n, d], (kind, inp.device()))?),
            false => None,
        };
        let (mut parts, mut scratch) = (Vec::new(), Scratch::default());
        for (index, part) in inp.f_split(chunk, 0)?.iter().enumerate() {
            let (start, rows) = (index as i64 * chunk, part.size()[0]);
            let mask = mask.map(|mask| mask.f_narrow(0, start, rows)).transpose()?;
            let into = mixed.as_ref().map(|m| m.f_narrow(0, start, rows)).transpose()?;
            let pooled =
                self.pooled_chunk::<A>(part, mask.as_ref(), request, into, &mut scratch)?;
            let Some(pooled) = pooled else { return Ok(None) };
            parts.extend(pooled.importance);
        }
        let importance = match request.want.importance() {
            true => Some(Tensor::f_cat(&parts, 0)?),
            false => None,
        };
        Ok(Some(Mixed { mixed, importance }))
    }

    /// [`MultiheadAttention::pooled`] of one chunk; the mixed vectors go `into` that tensor
    /// where one is given.
    fn pooled_chunk<A: Attend>(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        request: Request,
        into: Option<Tensor>,
        scratch: &mut Scratch,
    ) -> Result<Option<Mixed>> {
        let kind = inp.kind();
        if !mode::is_half(kind) {
            let Some(heads) = self.heads::<A>(inp, mask, request, true, scratch)? else {
                return Ok(None);
            };
            return self.project_out(heads, inp, request.skip, into).map(Some);
        }
        // Half precision pools in f32, then rounds the heads' output to half precision for the
        // output projection, where PyTorch rounds its attention output: the reordered sums
        // would otherwise round differently by more than half precision resolves.
        let up = |t: &Tensor| t.f_to_kind(Kind::Float);
        let wide = Self {
            derived: Default::default(),
            in_proj_weight: up(&self.in_proj_weight)?,
            in_proj_bias: self.in_proj_bias.as_ref().map(up).transpose()?,
            out_proj_weight: self.out_proj_weight.shallow_clone(),
            out_proj_bias: None,
            embed_dim: self.embed_dim,
            n_heads: self.n_heads,
        };
        let mask = mask.map(up).transpose()?;
        // The widened copy lives for this call only: packing its weights would not pay.
        let Some(heads) = wide.heads::<A>(&up(inp)?, mask.as_ref(), request, false, scratch)?
        else {
            return Ok(None);
        };
        let down = |t: Option<Tensor>| t.map(|t| t.f_to_kind(kind)).transpose();
        let heads = Heads {
            heads: down(heads.heads)?,
            importance: down(heads.importance)?,
            mean: down(heads.mean)?,
            packed_out: None,
        };
        self.project_out(heads, inp, request.skip, into).map(Some)
    }

    /// Applies the output projection to the heads' output, and adds the mean of `inp` over the
    /// features with `skip`: inside the projection's GEMM where the kernels pooled it already.
    /// The result goes `into` that tensor where one is given (inference only).
    fn project_out(
        &self,
        heads: Heads,
        inp: &Tensor,
        skip: bool,
        into: Option<Tensor>,
    ) -> Result<Mixed> {
        let Heads { heads, importance, mean, packed_out } = heads;
        let Some(heads) = heads else {
            return Ok(Mixed { mixed: None, importance });
        };
        if let Some(packed_out) = packed_out {
            // A small inference batch (the kernels ran): `heads W_o^T + b_o (+ mean)` in one
            // product against the packed projection.
            let add = mean.as_ref().filter(|_| skip);
            let d = self.embed_dim;
            if let Some(mixed) = kernels::linear(&heads, &packed_out, d, add)? {
                let mixed = match into {
                    Some(mut into) => into.f_copy_(&mixed).map(|_| into)?,
                    None => mixed,
                };
                return Ok(Mixed { mixed: Some(mixed), importance });
            }
        }
        let (w_o, b_o) = (&self.out_proj_weight, self.out_proj_bias.as_ref());
        let mixed = match (skip, mean) {
            // Half precision keeps PyTorch's roundings: the projection, then the mean.
            (true, Some(mean)) if mode::is_half(heads.kind()) => {
                heads.f_linear(w_o, b_o)?.f_add(&mean)?
            }
            (true, Some(mean)) => {
                // Inference only (the kernels ran): `mean + heads W_o^T` in one GEMM.
                let w_o_t = w_o.f_transpose(0, 1)?;
                let mut mixed = match &into {
                    Some(into) => mean.f_addmm_out(into, &heads, &w_o_t)?,
                    None => mean.f_addmm(&heads, &w_o_t)?,
                };
                if let Some(b_o) = b_o {
                    let _ = mixed.f_add_(b_o)?;
                }
                return Ok(Mixed { mixed: Some(mixed), importance });
            }
            (true, None) => {
                heads.f_linear(w_o, b_o)?.f_add(&inp.f_mean_dim(-2, false, None::<Kind>)?)?
            }
            (false, _) => heads.f_linear(w_o, b_o)?,
        };
        let mixed = match into {
            Some(mut into) => into.f_copy_(&mixed).map(|_| into)?,
            None => mixed,
        };
        Ok(Mixed { mixed: Some(mixed), importance })
    }

    /// [`MultiheadAttention::pooled`] up to the output projection. Small inference batches
    /// take the packed projections where `pack` allows packing.
    fn heads<A: Attend>(
        &self,
        inp: &Tensor,
        mask: Option<&Tensor>,
        request: Request,
        pack: bool,
        scratch: &mut Scratch,
    ) -> Result<Option<Heads>> {
        let (n, _, d) = inp.size3()?;
        let (h, dropout) = (self.n_heads, request.dropout);
        let average_heads = |w: &Tensor| -> Result<Option<Tensor>> {
            Ok(match request.want.importance() {
                true => Some(w.f_mean_dim(1, false, None::<Kind>)?),
                false => None,
            })
        };
        // The weights per head and key `(N, H, F)`. Inference on the CPU takes the one-pass
        // kernels, which also pool the inputs (and their mean, the skip term) into
        // `(H + 1, N, D)`.
        let output = request.want.output();
        let mut tensors = vec![inp, &self.in_proj_weight];
        tensors.extend(mask);
        let kernels = dropout == 0.0 && kernels::applies(&tensors);
        let small = pack && kernels && n < LARGE_BATCH;
        let derived = self.derived::<A>(small)?;
        let (key_weights, pooled, importance) = match kernels {
            true => {
                let packed = derived.packed.as_ref().filter(|_| small);
                let kernel = A::kernel(self, &derived, packed, inp, mask, output, scratch)?;
                let Some((key_weights, pooled)) = kernel else { return Ok(None) };
                let importance = average_heads(&key_weights)?;
                (key_weights, pooled, importance)
            }
            false => {
                let Some(weights) = A::head_weights(self, &derived, inp, mask)? else {
                    return Ok(None);
                };
                let importance = average_heads(&A::per_key(weights.shallow_clone())?)?;
                let dropped = match dropout > 0.0 {
                    true => weights.f_dropout(dropout, true)?,
                    false => weights,
                };
                (A::per_key(dropped)?, None, importance)
            }
        };
        if !output {
            return Ok(Some(Heads { heads: None, importance, mean: None, packed_out: None }));
        }
        // Each head's weights sum to 1, unless a row is fully masked or dropout is active. Under
        // autograd the bias is scaled by the sum all the same, so that it has the gradient
        // PyTorch gives it (NaN where the weights are).
        let weights_sum_to_one = mask.is_none() && dropout == 0.0 && !mode::grad_mode();
        let (pooled, mean) = match pooled {
            Some(pooled) => (pooled.f_narrow(0, 0, h)?, Some(pooled.f_get(h)?)),
            None => (key_weights.f_matmul(inp)?.f_transpose(0, 1)?, None), // (H, N, D)
        };
        // Small inference batches (the kernels ran, the weights packed): the heads' value
        // projections in one product against the packed weights, the output projection next.
        let packed = derived.packed.as_ref().filter(|_| small && weights_sum_to_one);
        if let Some(packed) = packed {
            if let Some(heads) = kernels::linear(&pooled, &packed.value, d / h, None)? {
                let packed_out = Some(packed.out.shallow_clone());
                return Ok(Some(Heads { heads: Some(heads), importance, mean, packed_out }));
            }
        }
        // Large inference batches (the kernels ran): each head's projection is one GEMM writing
        // its columns of the output in place, with the bias added by the GEMM where it is
        // exactly `b_v`. Elsewhere one batched GEMM, the bias added afterwards.
        let per_head = mean.is_some() && n >= LARGE_BATCH;
        let bias_in_gemm = per_head && weights_sum_to_one;
        let heads = match per_head {
            true => {
                let heads = scratch.take("heads", &[n, d], inp.kind())?;
                let hd = d / h;
                for head in 0..h {
                    let out = heads.f_narrow(1, head * hd, hd)?;
                    let (x, w) = (pooled.f_get(head)?, derived.value_weights.f_get(head)?);
                    let w_t = w.f_transpose(0, 1)?;
                    let _ = match (&derived.value_bias, bias_in_gemm) {
                        (Some(b_v), true) => {
                            b_v.f_view([h, hd])?.f_get(head)?.f_addmm_out(&out, &x, &w_t)?
                        }
                        _ => x.f_mm_out(&out, &w_t)?,
                    };
                }
                heads.f_view([n, h, hd])?
            }
            false => {
                let w_v_t = derived.value_weights.f_transpose(1, 2)?;
                pooled.f_bmm(&w_v_t)?.f_transpose(0, 1)? // (N, H, hd)
            }
        };
        let heads = match &derived.value_bias {
            Some(b_v) if !bias_in_gemm => match weights_sum_to_one {
                true => heads.f_add(b_v)?,
                false => {
                    let total = key_weights.f_sum_dim_intlist(-1, true, None::<Kind>)?; // (N, H, 1)
                    heads.f_add(&total.f_mul(b_v)?)?
                }
            },
            _ => heads,
        };
        let heads = Some(heads.f_reshape([n, d])?);
        Ok(Some(Heads { heads, importance, mean, packed_out: None }))
    }

    /// The tensors derived from the projections: cached between calls without autograd (until
    /// a weight changes), computed afresh while autograd records. With `pack`, they include the
    /// packed projections.
    pub(crate) fn derived<A: Attend>(&self, pack: bool) -> Result<Arc<Derived>> {
        let weights = [
            Some(&self.in_proj_weight),
            self.in_proj_bias.as_ref(),
            Some(&self.out_proj_weight),
            self.out_proj_bias.as_ref(),
        ];
        let mut key: DerivedKey = [None; 4];
        for (slot, t) in key.iter_mut().zip(weights) {
            if let Some(t) = t {
                *slot = Some((t.data_ptr() as usize, t.f_internal_version()?, t.kind()));
            }
        }
        let recording = mode::grad_mode();
        let mut cache = self.derived.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !recording {
            let current = |derived: &&Arc<Derived>| derived.key == key;
            let cached = cache.as_ref().filter(current);
            if let Some(derived) = cached.filter(|derived| derived.packed.is_some() || !pack) {
                return Ok(Arc::clone(derived));
            }
        }
        let d = self.embed_dim;
        let (h, hd) = (self.n_heads, d / self.n_heads);
        let scoring = A::derive(self)?;
        let value_weights = self.in_proj_weight.f_narrow(0, 2 * d, d)?.f_view([h, hd, d])?;
        let value_bias = match &self.in_proj_bias {
            Some(bias) => Some(bias.f_narrow(0, 2 * d, d)?.f_view([1, h, hd])?),
            None => None,
        };
        if recording {
            return Ok(Arc::new(Derived { key, scoring, value_weights, value_bias, packed: None }));
        }
        let derived = Arc::new(Derived {
            key,
            scoring: scoring.map(|t| t.f_contiguous()).transpose()?,
            value_weights: value_weights.f_contiguous()?,
            value_bias: value_bias.map(|b| b.f_contiguous()).transpose()?,
            packed: pack.then(|| Packed::new::<A>(self)).transpose()?,
        });
        *cache = Some(Arc::clone(&derived));
        Ok(derived)
    }
}

/// The softmax over the keys (the last dimension) of `scores`, after adding the additive
/// `mask` viewed as `mask_shape`. A row whose keys are all masked has no valid softmax: it gets
/// zero weights, with a finite softmax underneath so that no NaN reaches the gradients.
pub(crate) fn masked_softmax(
    scores: Tensor,
    mask: Option<&Tensor>,
    mask_shape: &[i64],
) -> Result<Tensor> {
    let Some(mask) = mask else {
        return Ok(scores.f_softmax(-1, None::<Kind>)?);
    };
    let mask = mask.f_view(mask_shape)?;
    let dead = mask.f_isneginf()?.f_all_dim(-1, true)?;
    let scores = scores.f_add(&mask)?.f_masked_fill(&dead, 0.0)?;
    Ok(scores.f_softmax(-1, None::<Kind>)?.f_masked_fill(&dead, 0.0)?)
}

#[cfg(test)]
mod tests {
    use tch::{nn, Device, Kind, Tensor};

    use super::*;
    use crate::{CrossAttentionMixer, SelfAttentionMixer};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        (a - b).abs().max().double_value(&[])
    }

    /// An f64 attention module with random weights and non-zero biases.
    fn attention(vs: &nn::VarStore, heads: i64) -> MultiheadAttention {
        let attention =
            MultiheadAttention::new(&vs.root(), 6, heads, true, Kind::Double, Device::Cpu).unwrap();
        for bias in [&attention.in_proj_bias, &attention.out_proj_bias].into_iter().flatten() {
            tch::no_grad(|| bias.shallow_clone().copy_(&(Tensor::randn_like(bias) * 0.3)));
        }
        attention
    }

    /// The pooled fast path against PyTorch's op sequence, with the query `A` attends with.
    fn pooled_equals_pytorch_sequence<A: Attend>() {
        tch::manual_seed(3);
        for heads in [1, 2, 3] {
            let vs = nn::VarStore::new(Device::Cpu);
            let attention = attention(&vs, heads);
            let inp = Tensor::randn([5, 4, 6], (Kind::Double, Device::Cpu)).set_requires_grad(true);
            let dead = Tensor::from_slice(&[true, true, true, true]).view([1, 4]);
            let rest = Tensor::rand([4, 4], (Kind::Float, Device::Cpu)).lt(0.4);
            let bool_mask = Tensor::cat(&[dead, rest], 0);
            let masks = [None, Some(attention.additive_mask(&bool_mask).unwrap())];
            for mask in masks.iter().map(Option::as_ref) {
                let query = A::query(5, 6, Kind::Double, Device::Cpu).unwrap();
                let mean = |t: Tensor| t.mean_dim(1, false, None::<Kind>);
                let reference_out =
                    mean(attention.output(query.as_ref(), &inp, mask, 0.0).unwrap());
                let reference_weights =
                    mean(attention.weights(query.as_ref(), &inp, mask).unwrap());
                let request = Request { want: Want::Both, skip: false, dropout: 0.0 };
                let fast = attention.pooled::<A>(&inp, mask, request).unwrap().unwrap();
                let (out, weights) = (fast.mixed.unwrap(), fast.importance.unwrap());
                assert!(max_diff(&out, &reference_out) < 1e-12, "output");
                assert!(max_diff(&weights, &reference_weights) < 1e-12, "weights");
                // Gradients of the same loss through both paths.
                let cotangent = Tensor::randn_like(&out);
                let mut wrt = vec![&inp, &attention.in_proj_weight, &attention.out_proj_weight];
                wrt.extend(attention.in_proj_bias.as_ref());
                wrt.extend(attention.out_proj_bias.as_ref());
                let loss = |t: &Tensor| (t * &cotangent).sum(Kind::Double);
                let fast_grads = Tensor::run_backward(&[loss(&out)], &wrt, false, false);
                let reference_grads =
                    Tensor::run_backward(&[loss(&reference_out)], &wrt, false, false);
                for (a, b) in fast_grads.iter().zip(&reference_grads) {
                    assert!(max_diff(a, b) < 1e-12, "gradient differs by {}", max_diff(a, b));
                }
            }
        }
    }

    #[test]
    fn pooled_cross_attention_equals_pytorch_sequence_with_gradients() {
        pooled_equals_pytorch_sequence::<CrossAttentionMixer>();
    }

    #[test]
    fn pooled_self_attention_equals_pytorch_sequence_with_gradients() {
        pooled_equals_pytorch_sequence::<SelfAttentionMixer>();
    }
}
