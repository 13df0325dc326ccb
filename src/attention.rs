//! [`MultiheadAttention`]: PyTorch's `nn.MultiheadAttention(batch_first=True)` with a key padding
//! mask, the one piece both attention mixers share.
//!
//! Parameter names, layout and initialisation are PyTorch's (`in_proj_weight [3D, D]`,
//! `in_proj_bias [3D]`, `out_proj.weight [D, D]`, `out_proj.bias [D]`), and so is the sequence of
//! operations: the projections, the per-head scaled dot products, SDPA for the output, the math
//! path for the weights. Only the fully masked row differs: PyTorch's softmax over nothing but
//! `-inf` gives NaN weights; here such a row gets all-zero weights (and so a zero attention output).

use tch::{nn, Device, Kind, Tensor};

use crate::error::{MixError, Result};
use crate::kernels;
use crate::mixer;

/// What attends to the keys: a learned-projection constant query (cross-attention) or the keys
/// themselves (self-attention).
#[derive(Debug, Clone, Copy)]
pub enum Query<'a> {
    /// Query vectors `(N, L, D)`, different from the keys.
    Cross(&'a Tensor),
    /// Every key position attends to every other (`L = S`).
    SelfAttention,
}

/// Multi-head scaled dot-product attention with PyTorch's parameter layout and names.
///
/// # Shapes
/// - keys and values: `(N, S, D)`; query: `(N, L, D)` (or the keys themselves);
/// - key padding mask: `(N, S)`, bool (`true` = ignore) or float (added to the scores);
/// - output: `(N, L, D)`; weights (averaged over heads): `(N, L, S)`.
#[derive(Debug)]
pub struct MultiheadAttention {
    /// Packed query, key and value projection, `(3 D, D)`; key `in_proj_weight`.
    pub in_proj_weight: Tensor,
    /// Packed projection bias, `(3 D,)`; key `in_proj_bias`. `None` without bias.
    pub in_proj_bias: Option<Tensor>,
    /// Output projection, `(D, D)`; key `out_proj.weight`.
    pub out_proj_weight: Tensor,
    /// Output projection bias, `(D,)`; key `out_proj.bias`. `None` without bias.
    pub out_proj_bias: Option<Tensor>,
    embed_dim: i64,
    n_heads: i64,
    /// Tensors derived from the weights that inference reuses from call to call.
    derived: std::sync::Mutex<Option<Derived>>,
}

/// Tensors derived from the input projection, `(key, tensors)`; the key (each weight's storage,
/// version counter and dtype) changes with every write to a weight, which voids them.
#[derive(Debug)]
struct Derived {
    key: Vec<(usize, i64, Kind)>,
    /// Cross-attention's folded key vectors, scaled: `(H, D)`.
    key_vectors: Tensor,
    /// The value projection per head: `(H, hd, D)`.
    value_weights: Tensor,
    /// The value bias per head: `(1, H, hd)`.
    value_bias: Option<Tensor>,
}

impl Derived {
    fn shallow_clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            key_vectors: self.key_vectors.shallow_clone(),
            value_weights: self.value_weights.shallow_clone(),
            value_bias: self.value_bias.as_ref().map(Tensor::shallow_clone),
        }
    }
}

impl MultiheadAttention {
    /// Creates the variables under `path` in `kind` on `device`, initialised like PyTorch.
    pub fn new(
        path: &nn::Path,
        embed_dim: i64,
        n_heads: i64,
        bias: bool,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        mixer::check_size("mod_dim", embed_dim, 1)?;
        mixer::check_size("n_heads", n_heads, 1)?;
        if embed_dim % n_heads != 0 {
            return Err(MixError::Config(format!(
                "n_heads must divide mod_dim evenly, got n_heads = {n_heads} for mod_dim = {embed_dim}"
            )));
        }
        let options = (kind, device);
        let empty = |dims: &[i64]| Tensor::f_empty(dims, options);
        let in_proj_weight =
            mixer::add_variable(path, "in_proj_weight", empty(&[3 * embed_dim, embed_dim])?)?;
        let in_proj_bias = match bias {
            true => Some(mixer::add_variable(path, "in_proj_bias", empty(&[3 * embed_dim])?)?),
            false => None,
        };
        let out_proj = path / "out_proj";
        let out_proj_weight =
            mixer::add_variable(&out_proj, "weight", empty(&[embed_dim, embed_dim])?)?;
        let out_proj_bias = match bias {
            true => Some(mixer::add_variable(&out_proj, "bias", empty(&[embed_dim])?)?),
            false => None,
        };
        let mut attention = Self {
            derived: Default::default(),
            in_proj_weight,
            in_proj_bias,
            out_proj_weight,
            out_proj_bias,
            embed_dim,
            n_heads,
        };
        attention.reset_parameters()?;
        Ok(attention)
    }

    /// The number of heads.
    pub fn n_heads(&self) -> i64 {
        self.n_heads
    }

    /// PyTorch's initialisation: xavier-uniform `in_proj_weight`, zero biases, and `nn.Linear`'s
    /// init for `out_proj.weight` (which PyTorch's `_reset_parameters` leaves alone; we redraw it).
    pub fn reset_parameters(&mut self) -> Result<()> {
        let bound = (6.0 / (4 * self.embed_dim) as f64).sqrt();
        tch::no_grad(|| -> Result<()> {
            let _ = self.in_proj_weight.f_uniform_(-bound, bound)?;
            for bias in
                [self.in_proj_bias.as_mut(), self.out_proj_bias.as_mut()].into_iter().flatten()
            {
                let _ = bias.f_zero_()?;
            }
            Ok(())
        })?;
        mixer::init_linear(&mut self.out_proj_weight, None)
    }

    /// The variables under their `state_dict` keys relative to the attention module.
    pub fn variables(&self) -> Vec<(&'static str, Tensor)> {
        let mut variables = vec![("in_proj_weight", self.in_proj_weight.shallow_clone())];
        if let Some(bias) = &self.in_proj_bias {
            variables.push(("in_proj_bias", bias.shallow_clone()));
        }
        variables.push(("out_proj.weight", self.out_proj_weight.shallow_clone()));
        if let Some(bias) = &self.out_proj_bias {
            variables.push(("out_proj.bias", bias.shallow_clone()));
        }
        variables
    }

    /// The key padding mask as PyTorch canonicalises it: additive, in the weights' dtype, `(N, S)`.
    pub fn additive_mask(&self, mask: &Tensor) -> Result<Tensor> {
        let kind = self.in_proj_weight.kind();
        Ok(if mask.kind() == Kind::Bool {
            Tensor::f_zeros(mask.size(), (kind, mask.device()))?
                .f_masked_fill(mask, f64::NEG_INFINITY)?
        } else {
            mask.f_to_kind(kind)?
        })
    }

    /// Projects into per-head queries, keys and values, PyTorch's `_in_projection_packed` and head
    /// split, in its sequence-first layout: `(N H, L, D/H)`, `(N H, S, D/H)`, `(N H, S, D/H)`.
    fn project(&self, query: Query, inp: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, s, d) = inp.size3()?;
        let key = inp.f_transpose(1, 0)?; // (S, N, D), a view as in PyTorch's batch_first handling
        let split = |proj: Tensor, parts: i64| -> Result<Tensor> {
            Ok(proj
                .f_unflatten(-1, [parts, d])?
                .f_unsqueeze(0)?
                .f_transpose(0, -2)?
                .f_squeeze_dim(-2)?
                .f_contiguous()?)
        };
        let (q, k, v) = match query {
            Query::SelfAttention => {
                let proj =
                    split(key.f_linear(&self.in_proj_weight, self.in_proj_bias.as_ref())?, 3)?;
                (proj.f_get(0)?, proj.f_get(1)?, proj.f_get(2)?)
            }
            Query::Cross(query) => {
                let weights = self.in_proj_weight.f_split_with_sizes([d, 2 * d], 0)?;
                let biases = match &self.in_proj_bias {
                    Some(bias) => {
                        bias.f_split_with_sizes([d, 2 * d], 0)?.into_iter().map(Some).collect()
                    }
                    None => vec![None, None],
                };
                let q = query.f_transpose(1, 0)?.f_linear(&weights[0], biases[0].as_ref())?;
                let kv = split(key.f_linear(&weights[1], biases[1].as_ref())?, 2)?;
                (q, kv.f_get(0)?, kv.f_get(1)?)
            }
        };
        let l = q.size()[0];
        let head_dim = d / self.n_heads;
        let heads = |t: Tensor, len: i64| -> Result<Tensor> {
            Ok(t.f_view([len, n * self.n_heads, head_dim])?.f_transpose(0, 1)?)
        };
        Ok((heads(q, l)?, heads(k, s)?, heads(v, s)?))
    }

    /// PyTorch's key padding mask for `n` batches: `(N, S)` -> `(N H, 1, S)`.
    fn head_mask(&self, mask: &Tensor) -> Result<Tensor> {
        let (n, s) = mask.size2()?;
        Ok(mask.f_view([n, 1, 1, s])?.f_expand([-1, self.n_heads, -1, -1], false)?.f_reshape([
            n * self.n_heads,
            1,
            s,
        ])?)
    }

    /// The attention output, PyTorch's `need_weights=False` path (scaled dot-product attention).
    /// `mask` is additive (see [`MultiheadAttention::additive_mask`]); `dropout` applies to the
    /// attention weights.
    ///
    /// # Shapes
    /// `inp`: `(N, S, D)`, `mask`: `(N, S)`; returns `(N, L, D)`.
    pub fn output(
        &self,
        query: Query,
        inp: &Tensor,
        mask: Option<&Tensor>,
        dropout: f64,
    ) -> Result<Tensor> {
        let (n, s, d) = inp.size3()?;
        let (q, k, v) = self.project(query, inp)?;
        let l = q.size()[1];
        let hd = d / self.n_heads;
        let mask = match mask {
            Some(mask) => {
                let mask = self.head_mask(mask)?;
                Some(if n * self.n_heads == 1 {
                    mask.f_unsqueeze(0)?
                } else {
                    mask.f_view([n, self.n_heads, -1, s])?
                })
            }
            None => None,
        };
        let (q, k, v) = (
            q.f_view([n, self.n_heads, l, hd])?,
            k.f_view([n, self.n_heads, s, hd])?,
            v.f_view([n, self.n_heads, s, hd])?,
        );
        let out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            dropout,
            false,
            None,
            false,
        )?;
        let out = out.f_permute([2, 0, 1, 3])?.f_contiguous()?.f_view([n * l, d])?;
        let out =
            out.f_linear(&self.out_proj_weight, self.out_proj_bias.as_ref())?.f_view([l, n, d])?;
        Ok(out.f_transpose(1, 0)?)
    }

    /// The attention weights averaged over heads, PyTorch's `need_weights=True` math path, with
    /// all-zero weights for a fully masked row instead of NaN.
    ///
    /// # Shapes
    /// `inp`: `(N, S, D)`, `mask`: `(N, S)`; returns `(N, L, S)`.
    pub fn weights(&self, query: Query, inp: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (n, s, d) = inp.size3()?;
        let (q, k, _) = self.project(query, inp)?;
        let l = q.size()[1];
        let q_scaled = q.f_mul_scalar((1.0 / (d / self.n_heads) as f64).sqrt())?;
        let k_t = k.f_transpose(-2, -1)?;
        let weights = match mask {
            Some(mask) => {
                let mask = self.head_mask(mask)?;
                let scores = mask.f_baddbmm(&q_scaled, &k_t, 1, 1)?;
                // A row that is -inf everywhere has no valid softmax: give it zero weights,
                // with a finite softmax underneath so that no NaN reaches the gradients.
                let dead = scores.f_isneginf()?.f_all_dim(-1, true)?;
                scores
                    .f_masked_fill(&dead, 0.0)?
                    .f_softmax(-1, None::<Kind>)?
                    .f_masked_fill(&dead, 0.0)?
            }
            None => q_scaled.f_bmm(&k_t)?.f_softmax(-1, None::<Kind>)?,
        };
        Ok(weights.f_view([n, self.n_heads, l, s])?.f_mean_dim(1, false, None::<Kind>)?)
    }

    /// Attention pooling as the mixers need it, computed along the shortest path: the mixed vector
    /// per instance and, if asked, the importance, without ever forming the `(N, F, 3 D)`
    /// projection. The value path is linear, so the inputs are pooled with the attention weights
    /// first and projected afterwards, once per instance instead of once per feature:
    /// `mean_i sum_j a_ij (W_v x_j + b_v) = W_v (sum_j b_j x_j) + (sum_j b_j) b_v` with
    /// `b_j = mean_i a_ij`. For cross-attention the constant query also folds the key projection
    /// into one vector per head: `q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + c_h`, and `c_h`
    /// cancels in the softmax. Dropout (if `dropout > 0`) drops attention weights as PyTorch
    /// does, and the bias term keeps the sum of the dropped weights; a fully masked row pools
    /// nothing and gives `out_proj.bias`.
    ///
    /// Equal to [`MultiheadAttention::output`] (averaged over queries) and
    /// [`MultiheadAttention::weights`] up to rounding; the tests hold it to them.
    ///
    /// With `skip`, the mixed vectors include the mean of the inputs over the features (the
    /// mixers' residual term), added where it is cheapest.
    ///
    /// # Shapes
    /// `inp`: `(N, F, D)`, `mask`: additive `(N, F)`; returns the mixed `(N, D)` (if `output`)
    /// and the importance `(N, F)` (if `importance`).
    #[allow(clippy::too_many_arguments)]
    pub fn pool(
        &self,
        pooling: Pooling,
        inp: &Tensor,
        mask: Option<&Tensor>,
        dropout: f64,
        output: bool,
        importance: bool,
        skip: bool,
    ) -> Result<Pooled> {
        let kind = inp.kind();
        let (n, f, d) = inp.size3()?;
        // Self-attention's chunks keep its queries and keys, `(n, F, 2 D)`, at half the chunk
        // bytes, so that they stay in the cache until the weights kernel reads them.
        let row_bytes = match pooling {
            Pooling::Cross => f * d,
            Pooling::SelfMean => f * d * 4,
        } * kind.elt_size_in_bytes() as i64;
        let chunk = (CHUNK_BYTES / row_bytes.max(1)).max(1);
        if n > chunk && dropout == 0.0 && kernels::applies(&[inp, &self.in_proj_weight]) {
            // Large inference batches go in chunks that stay in the cache from the scores to
            // the pooling, and whose buffers the allocator reuses instead of mapping new pages.
            // The chunks write their mixed vectors straight into the rows of the result.
            let mixed = match output {
                true => Some(Tensor::f_empty([n, d], (kind, inp.device()))?),
                false => None,
            };
            let (mut parts, mut scratch) = (Vec::new(), kernels::Scratch::default());
            for (index, part) in inp.f_split(chunk, 0)?.iter().enumerate() {
                let (start, rows) = (index as i64 * chunk, part.size()[0]);
                let mask = match mask {
                    Some(mask) => Some(mask.f_narrow(0, start, rows)?),
                    None => None,
                };
                let into = mixed.as_ref().map(|m| m.f_narrow(0, start, rows)).transpose()?;
                let (mask, asked) = (mask.as_ref(), (output, importance, skip));
                let pooled =
                    self.pool_part(pooling, part, mask, dropout, asked, into, &mut scratch)?;
                parts.extend(pooled.importance);
            }
            let importance = match importance {
                true => Some(Tensor::f_cat(&parts, 0)?),
                false => None,
            };
            return Ok(Pooled { mixed, importance });
        }
        let asked = (output, importance, skip);
        self.pool_part(pooling, inp, mask, dropout, asked, None, &mut Default::default())
    }

    /// [`MultiheadAttention::pool`] of one chunk, `asked` being `(output, importance, skip)`;
    /// the mixed vectors go `into` that tensor where one is given.
    #[allow(clippy::too_many_arguments)]
    fn pool_part(
        &self,
        pooling: Pooling,
        inp: &Tensor,
        mask: Option<&Tensor>,
        dropout: f64,
        asked: (bool, bool, bool),
        into: Option<Tensor>,
        scratch: &mut kernels::Scratch,
    ) -> Result<Pooled> {
        let (kind, (output, importance, skip)) = (inp.kind(), asked);
        if !mixer::is_half(kind) {
            let heads =
                self.pool_heads(pooling, inp, mask, dropout, (output, importance), scratch)?;
            return self.project_out(heads, inp, skip, into);
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
        let (inp_f32, mask) = (up(inp)?, mask.as_ref());
        let heads =
            wide.pool_heads(pooling, &inp_f32, mask, dropout, (output, importance), scratch)?;
        let down = |t: Option<Tensor>| t.map(|t| t.f_to_kind(kind)).transpose();
        let heads = Heads {
            heads: down(heads.heads)?,
            importance: down(heads.importance)?,
            mean: down(heads.mean)?,
        };
        self.project_out(heads, inp, skip, into)
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
    ) -> Result<Pooled> {
        let Heads { heads, importance, mean } = heads;
        let Some(heads) = heads else {
            return Ok(Pooled { mixed: None, importance });
        };
        let (w_o, b_o) = (&self.out_proj_weight, self.out_proj_bias.as_ref());
        let mixed = match (skip, mean) {
            // Half precision keeps PyTorch's roundings: the projection, then the mean.
            (true, Some(mean)) if mixer::is_half(heads.kind()) => {
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
                return Ok(Pooled { mixed: Some(mixed), importance });
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
        Ok(Pooled { mixed: Some(mixed), importance })
    }

    /// [`MultiheadAttention::pool`] up to the output projection.
    fn pool_heads(
        &self,
        pooling: Pooling,
        inp: &Tensor,
        mask: Option<&Tensor>,
        dropout: f64,
        (output, importance): (bool, bool),
        scratch: &mut kernels::Scratch,
    ) -> Result<Heads> {
        let (n, _, d) = inp.size3()?;
        let h = self.n_heads;
        let average_heads = |w: &Tensor| -> Result<Option<Tensor>> {
            Ok(match importance {
                true => Some(w.f_mean_dim(1, false, None::<Kind>)?),
                false => None,
            })
        };
        // The weights per head and key `(N, H, F)`: cross-attention has one query,
        // self-attention averages its queries. Inference on the CPU takes the one-pass kernels,
        // which also pool the inputs (and their mean, the skip term) into `(H + 1, N, D)`.
        let (key_weights, pooled, importance) =
            match self.pool_kernel(pooling, inp, mask, dropout, output, scratch)? {
                Some((key_weights, pooled)) => {
                    let importance = average_heads(&key_weights)?;
                    (key_weights, pooled, importance)
                }
                None => {
                    let weights = self.pooling_weights(pooling, inp, mask)?;
                    let per_key = |w: Tensor| -> Result<Tensor> {
                        Ok(match pooling {
                            Pooling::Cross => w,
                            Pooling::SelfMean => w.f_mean_dim(2, false, None::<Kind>)?,
                        })
                    };
                    let importance = average_heads(&per_key(weights.shallow_clone())?)?;
                    let dropped = match dropout > 0.0 {
                        true => weights.f_dropout(dropout, true)?,
                        false => weights,
                    };
                    (per_key(dropped)?, None, importance)
                }
            };
        if !output {
            return Ok(Heads { heads: None, importance, mean: None });
        }
        let derived = self.derived()?;
        // Each head's weights sum to 1, unless a row is fully masked or dropout is active.
        let weights_sum_to_one = mask.is_none() && dropout == 0.0;
        let (pooled, mean) = match pooled {
            Some(pooled) => (pooled.f_narrow(0, 0, h)?, Some(pooled.f_get(h)?)),
            None => (key_weights.f_matmul(inp)?.f_transpose(0, 1)?, None), // (H, N, D)
        };
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
        Ok(Heads { heads: Some(heads.f_reshape([n, d])?), importance, mean })
    }

    /// The one-pass CPU kernels for inference: the per-key weights `(N, H, F)` and, if
    /// `output`, the pooled inputs and their mean `(H + 1, N, D)`; `None` where they do not
    /// apply (autograd, dropout, CUDA, half precision).
    fn pool_kernel(
        &self,
        pooling: Pooling,
        inp: &Tensor,
        mask: Option<&Tensor>,
        dropout: f64,
        output: bool,
        scratch: &mut kernels::Scratch,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let mut tensors = vec![inp, &self.in_proj_weight];
        tensors.extend(mask);
        if dropout > 0.0 || !kernels::applies(&tensors) {
            return Ok(None);
        }
        let (_, _, d) = inp.size3()?;
        let (h, hd) = (self.n_heads, d / self.n_heads);
        let scale = 1.0 / (hd as f64).sqrt();
        Ok(match pooling {
            Pooling::Cross => {
                kernels::cross(inp, &self.derived()?.key_vectors, mask, output, scratch)?
            }
            Pooling::SelfMean => {
                let large = inp.size()[0] >= LARGE_BATCH;
                let qk = self.self_queries_keys(inp, large.then_some(scratch))?;
                match kernels::self_weights(&qk, h, scale, mask, scratch)? {
                    Some(weights) => {
                        let pooled = match output {
                            true => kernels::pool(&weights, inp, 0.0, true, scratch)?,
                            false => None,
                        };
                        Some((weights, pooled))
                    }
                    None => None,
                }
            }
        })
    }

    /// The tensors derived from the input projection: cached between calls without autograd
    /// (until a weight changes), computed afresh while autograd records.
    fn derived(&self) -> Result<Derived> {
        let weights = [Some(&self.in_proj_weight), self.in_proj_bias.as_ref()];
        let key: Vec<(usize, i64, Kind)> = weights
            .into_iter()
            .flatten()
            .map(|t| Ok((t.data_ptr() as usize, t.f_internal_version()?, t.kind())))
            .collect::<Result<_>>()?;
        let recording = mixer::grad_mode();
        let mut cache = self.derived.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !recording {
            if let Some(derived) = cache.as_ref().filter(|derived| derived.key == key) {
                return Ok(derived.shallow_clone());
            }
        }
        let d = self.embed_dim;
        let (h, hd) = (self.n_heads, d / self.n_heads);
        let compute = || -> Result<Derived> {
            let scale = 1.0 / (hd as f64).sqrt();
            let key_vectors = self.cross_key_vectors(d)?.f_mul_scalar(scale)?;
            let w_v = self.in_proj_weight.f_narrow(0, 2 * d, d)?.f_view([h, hd, d])?;
            let value_bias = match &self.in_proj_bias {
                Some(bias) => Some(bias.f_narrow(0, 2 * d, d)?.f_view([1, h, hd])?),
                None => None,
            };
            let value_weights = w_v;
            Ok(match recording {
                true => Derived { key, key_vectors, value_weights, value_bias },
                false => Derived {
                    key,
                    key_vectors: key_vectors.f_contiguous()?,
                    value_weights: value_weights.f_contiguous()?,
                    value_bias: value_bias.map(|b| b.f_contiguous()).transpose()?,
                },
            })
        };
        let derived = compute()?;
        if !recording {
            *cache = Some(derived.shallow_clone());
        }
        Ok(derived)
    }

    /// Cross-attention's key projection folded with its constant query: `u_h = W_k,h^T q_h`
    /// with `q = W_q 1 + b_q`, `(H, D)`; then `q_h . k_h(x) = u_h . x + const_h`.
    fn cross_key_vectors(&self, d: i64) -> Result<Tensor> {
        let (h, hd) = (self.n_heads, d / self.n_heads);
        let w_q = self.in_proj_weight.f_narrow(0, 0, d)?;
        let mut q = w_q.f_sum_dim_intlist(1, false, None::<Kind>)?;
        if let Some(bias) = &self.in_proj_bias {
            q = q.f_add(&bias.f_narrow(0, 0, d)?)?;
        }
        let w_k = self.in_proj_weight.f_narrow(0, d, d)?.f_view([h, hd, d])?;
        Ok(q.f_view([h, 1, hd])?.f_bmm(&w_k)?.f_view([h, d])?)
    }

    /// Self-attention's queries and keys, `(N, F, 2 D)`: the one projection it cannot avoid.
    /// With `scratch` (inference only), into its reused buffer.
    fn self_queries_keys(
        &self,
        inp: &Tensor,
        scratch: Option<&mut kernels::Scratch>,
    ) -> Result<Tensor> {
        let d = self.embed_dim;
        let w_qk = self.in_proj_weight.f_narrow(0, 0, 2 * d)?;
        let b_qk = match &self.in_proj_bias {
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

    /// The softmaxed attention weights the pooling needs, per head: `(N, H, F)` for the constant
    /// query of cross-attention, `(N, H, F, F)` (queries x keys) for self-attention.
    fn pooling_weights(
        &self,
        pooling: Pooling,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (n, f, d) = inp.size3()?;
        let (h, hd) = (self.n_heads, d / self.n_heads);
        let scale = 1.0 / (hd as f64).sqrt();
        let (scores, mask_shape) = match pooling {
            Pooling::Cross => {
                // (N, F, H); a transposed view of `(H, D)`, the layout MKL takes fastest.
                let scores = inp.f_matmul(&self.derived()?.key_vectors.f_transpose(0, 1)?)?;
                (scores.f_transpose(1, 2)?, vec![n, 1, f])
            }
            Pooling::SelfMean => {
                let qk = self.self_queries_keys(inp, None)?; // (N, F, 2 D)
                let q = qk.f_narrow(-1, 0, d)?.f_view([n, f, h, hd])?.f_transpose(1, 2)?;
                let k = qk.f_narrow(-1, d, d)?.f_view([n, f, h, hd])?.f_permute([0, 2, 3, 1])?;
                let scores = q.f_mul_scalar(scale)?.f_matmul(&k)?; // (N, H, F, F)
                (scores, vec![n, 1, 1, f])
            }
        };
        let Some(mask) = mask else {
            return Ok(scores.f_softmax(-1, None::<Kind>)?);
        };
        let mask = mask.f_view(mask_shape.as_slice())?;
        // A row whose keys are all masked has no valid softmax: it gets zero weights, with a
        // finite softmax underneath so that no NaN reaches the gradients.
        let dead = mask.f_isneginf()?.f_all_dim(-1, true)?;
        let scores = scores.f_add(&mask)?.f_masked_fill(&dead, 0.0)?;
        Ok(scores.f_softmax(-1, None::<Kind>)?.f_masked_fill(&dead, 0.0)?)
    }
}

/// Instances from which inference projects into reused buffers and runs the value projection
/// as one GEMM per head; smaller batches take fewer, allocating ops.
const LARGE_BATCH: i64 = 256;

/// Input bytes per chunk of a large inference batch (about half a last-level cache).
const CHUNK_BYTES: i64 = 16 << 20;

/// What [`MultiheadAttention::pool`] returns; each part only where it was asked for.
#[derive(Debug)]
pub struct Pooled {
    /// The mixed vectors `(N, D)`: the attention output (averaged over queries), plus the mean
    /// of the inputs over the features where `skip` was asked for.
    pub mixed: Option<Tensor>,
    /// The importance `(N, F)`: attention weights averaged over heads (and queries).
    pub importance: Option<Tensor>,
}

/// [`MultiheadAttention::pool`] before the output projection.
struct Heads {
    /// The heads' concatenated output `(N, D)`.
    heads: Option<Tensor>,
    /// As [`Pooled::importance`].
    importance: Option<Tensor>,
    /// The mean of the inputs over the features `(N, D)`, where the kernels pooled it.
    mean: Option<Tensor>,
}

/// How the attention mixers pool: which query attends, and how its results are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// One learned-projection constant query attends over the features (`CrossAttentionMixer`).
    Cross,
    /// Every feature attends to all; the results are averaged over the queries
    /// (`SelfAttentionMixer`).
    SelfMean,
}

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

/// What the two attention mixers share: the attention module, the hyper-parameters, input
/// validation and the flattening of any number of leading dimensions into one batch.
#[derive(Debug)]
pub(crate) struct AttentionCore {
    pub(crate) attention: MultiheadAttention,
    pub(crate) mod_dim: i64,
    pub(crate) config: AttentionConfig,
}

/// An input flattened to `(N, F, D)` with its additive mask `(N, F)` and its leading dimensions.
pub(crate) struct Batch {
    pub(crate) inp: Tensor,
    pub(crate) mask: Option<Tensor>,
    pub(crate) leading: Vec<i64>,
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

    /// Validates `inp` and `mask`; `None` for an input without features, else the flattened batch.
    pub(crate) fn batch(&self, inp: &Tensor, mask: Option<&Tensor>) -> Result<Option<Batch>> {
        mixer::check_input(inp, mask, self.mod_dim, None, self.kind(), self.device())?;
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

    /// [`MultiheadAttention::pool`] along PyTorch's own op sequence ([`MultiheadAttention::output`]
    /// and [`MultiheadAttention::weights`]), for half precision under autograd.
    fn reference(
        &self,
        pooling: Pooling,
        batch: &Batch,
        dropout: f64,
        output: bool,
        importance: bool,
    ) -> Result<Pooled> {
        let (n, _, d) = batch.inp.size3()?;
        let ones = Tensor::f_ones([1, d], (self.kind(), self.device()))?;
        let constant = ones.f_expand([n, 1, d], false)?;
        let query = match pooling {
            Pooling::Cross => Query::Cross(&constant),
            Pooling::SelfMean => Query::SelfAttention,
        };
        let (inp, mask) = (&batch.inp, batch.mask.as_ref());
        let mean_over_queries = |t: Tensor| t.f_mean_dim(1, false, None::<Kind>);
        let mixed = match output {
            true => Some(mean_over_queries(self.attention.output(query, inp, mask, dropout)?)?),
            false => None,
        };
        let weights = match importance {
            true => Some(mean_over_queries(self.attention.weights(query, inp, mask)?)?),
            false => None,
        };
        Ok(Pooled { mixed, importance: weights })
    }

    /// Runs one attention mixer: the mixed features `(..., mod_dim)` (or `(..., 1, mod_dim)` with
    /// `keep_dim`) if `output`, and the importance `(..., n_features)` if `importance`.
    pub(crate) fn mix(
        &self,
        pooling: Pooling,
        inp: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
        output: bool,
        importance: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(batch) = self.batch(inp, mask)? else {
            let shape = inp.size();
            let none = Tensor::f_zeros(&shape[..shape.len() - 1], (self.kind(), self.device()))?;
            let mixed = mixer::without_features(inp, self.config.keep_dim)?;
            return Ok((output.then_some(mixed), importance.then_some(none)));
        };
        let AttentionConfig { dropout, skip, keep_dim, .. } = self.config;
        let p = if train { dropout } else { 0.0 };
        // The pooling adds the skip term itself where no output dropout comes between.
        let reference = mixer::use_reference(self.kind());
        let skip_inside = skip && p == 0.0 && !reference;
        let Pooled { mixed, importance: weights } = match reference {
            true => self.reference(pooling, &batch, p, output, importance)?,
            false => {
                let (inp, mask) = (&batch.inp, batch.mask.as_ref());
                self.attention.pool(pooling, inp, mask, p, output, importance, skip_inside)?
            }
        };
        let skip_after = skip && !skip_inside;
        let mixed = match mixed {
            Some(mixed) => {
                let shape: Vec<i64> =
                    batch.leading.iter().copied().chain([1, self.mod_dim]).collect();
                Some(mixer::finish(
                    mixed.f_reshape(shape)?,
                    inp,
                    dropout,
                    skip_after,
                    keep_dim,
                    train,
                )?)
            }
            None => None,
        };
        let weights = match weights {
            Some(weights) => {
                let shape: Vec<i64> =
                    batch.leading.iter().copied().chain([weights.size()[1]]).collect();
                Some(weights.f_reshape(shape)?)
            }
            None => None,
        };
        Ok((mixed, weights))
    }
}

/// Defines an attention mixer: `$name`, with the docs given, pooling as `$pooling`. Both
/// attention mixers are this one implementation over [`AttentionCore`]; they differ only in how
/// they pool.
macro_rules! attention_mixer {
    ($(#[$doc:meta])* $name:ident, $pooling:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name {
            core: $crate::attention::AttentionCore,
        }

        impl $name {
            /// Creates the mixer with its variables `attention.in_proj_weight`, `attention.in_proj_bias`,
            /// `attention.out_proj.weight` and `attention.out_proj.bias` under `path`, in the VarStore's
            /// dtype and device, initialised like PyTorch's `nn.MultiheadAttention`.
            pub fn new(path: &tch::nn::Path, mod_dim: i64, config: $crate::AttentionConfig) -> $crate::Result<Self> {
                Ok(Self { core: $crate::attention::AttentionCore::new(path, mod_dim, config, path.kind(), path.device())? })
            }

            /// The hyper-parameters.
            pub fn config(&self) -> $crate::AttentionConfig {
                self.core.config
            }

            /// The attention module (its tensors are public).
            pub fn attention(&self) -> &crate::MultiheadAttention {
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

            fn f_forward_t(&self, inp: &tch::Tensor, mask: Option<&tch::Tensor>, train: bool) -> $crate::Result<tch::Tensor> {
                let (mixed, _) = self.core.mix($pooling, inp, mask, train, true, false)?;
                Ok(mixed.expect("asked for"))
            }

            fn f_importance(&self, inp: &tch::Tensor, mask: Option<&tch::Tensor>) -> $crate::Result<tch::Tensor> {
                let (_, importance) = self.core.mix($pooling, inp, mask, false, false, true)?;
                Ok(importance.expect("asked for"))
            }

            fn f_forward_and_importance_t(
                &self,
                inp: &tch::Tensor,
                mask: Option<&tch::Tensor>,
                train: bool,
            ) -> $crate::Result<(tch::Tensor, tch::Tensor)> {
                let (mixed, importance) = self.core.mix($pooling, inp, mask, train, true, true)?;
                Ok((mixed.expect("asked for"), importance.expect("asked for")))
            }

            fn reset_parameters(&mut self) -> $crate::Result<()> {
                self.core.attention.reset_parameters()
            }

            fn variables(&self) -> Vec<(&'static str, tch::Tensor)> {
                self.core.variables()
            }

            fn fresh(&self, path: &tch::nn::Path) -> $crate::Result<Self> {
                let core = $crate::attention::AttentionCore::new(
                    path,
                    self.core.mod_dim,
                    self.core.config,
                    self.kind(),
                    self.device(),
                )?;
                Ok(Self { core })
            }
        }

        crate::mixer::impl_module_t!($name);
    };
}
pub(crate) use attention_mixer;
