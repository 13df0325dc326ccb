//! [`MultiheadAttention`]: PyTorch's `nn.MultiheadAttention(batch_first=True)` with a key padding
//! mask, its parameters and PyTorch's own sequence of operations.
//!
//! Parameter names, layout and initialisation are PyTorch's (`in_proj_weight [3D, D]`,
//! `in_proj_bias [3D]`, `out_proj.weight [D, D]`, `out_proj.bias [D]`), and so is the sequence of
//! operations of [`MultiheadAttention::output`] and [`MultiheadAttention::weights`]: the
//! projections, the per-head scaled dot products, SDPA for the output, the math path for the
//! weights. The mixers take that sequence in half precision under autograd (so that gradients
//! round as PyTorch's do), and the tests hold the fast path (`super::fast`) to it. Only the
//! fully masked row differs: PyTorch's softmax over nothing but `-inf` gives NaN weights; here
//! such a row gets all-zero weights (and so a zero attention output).

use tch::{nn, Device, Kind, Tensor};

use super::fast::DerivedCache;
use crate::error::{MixError, Result};
use crate::mixer;

/// Multi-head scaled dot-product attention with PyTorch's parameter layout, names and
/// initialisation: the layer inside both attention mixers, whose weights it makes public.
///
/// # Shapes
/// - keys and values: `(N, S, D)` with `D = embed_dim`; query: `(N, L, D)` (or the keys
///   themselves, for self-attention);
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
    pub(super) embed_dim: i64,
    pub(super) n_heads: i64,
    /// Tensors derived from the weights that inference reuses from call to call.
    pub(super) derived: DerivedCache,
}

impl MultiheadAttention {
    /// Creates the variables under `path` in `kind` on `device`, initialised like PyTorch.
    /// `n_heads` must divide `embed_dim`.
    ///
    /// # Errors
    /// [`MixError::Config`] where `n_heads` is below 1 or does not divide `embed_dim`;
    /// [`MixError::DuplicateVariable`] where `path` already holds the variables.
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
        let packed = mixer::checked_product("3 * mod_dim", &[3, embed_dim])?;
        let options = (kind, device);
        let empty = |dims: &[i64]| Tensor::f_empty(dims, options);
        let in_proj_weight =
            mixer::add_variable(path, "in_proj_weight", empty(&[packed, embed_dim])?)?;
        let in_proj_bias = match bias {
            true => Some(mixer::add_variable(path, "in_proj_bias", empty(&[packed])?)?),
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

    /// The model width `D`, the size of each input vector.
    pub fn embed_dim(&self) -> i64 {
        self.embed_dim
    }

    /// PyTorch's initialisation: xavier-uniform `in_proj_weight`, zero biases, and `nn.Linear`'s
    /// init for `out_proj.weight` (which PyTorch's `_reset_parameters` leaves alone; we redraw it).
    pub fn reset_parameters(&mut self) -> Result<()> {
        let bound = (6.0 / (4.0 * self.embed_dim as f64)).sqrt();
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
    pub(crate) fn additive_mask(&self, mask: &Tensor) -> Result<Tensor> {
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
    /// `query` is `None` for self-attention (the keys attend).
    fn project(&self, query: Option<&Tensor>, inp: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
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
            None => {
                let proj =
                    split(key.f_linear(&self.in_proj_weight, self.in_proj_bias.as_ref())?, 3)?;
                (proj.f_get(0)?, proj.f_get(1)?, proj.f_get(2)?)
            }
            Some(query) => {
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
    /// attention weights; `query` is `None` for self-attention.
    ///
    /// # Shapes
    /// `query`: `(N, L, D)`, `inp`: `(N, S, D)`, `mask`: `(N, S)`; returns `(N, L, D)`.
    pub(crate) fn output(
        &self,
        query: Option<&Tensor>,
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
    /// all-zero weights for a fully masked row instead of NaN; `query` is `None` for
    /// self-attention.
    ///
    /// # Shapes
    /// `query`: `(N, L, D)`, `inp`: `(N, S, D)`, `mask`: `(N, S)`; returns `(N, L, S)`.
    pub(crate) fn weights(
        &self,
        query: Option<&Tensor>,
        inp: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
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
}
