//! Cross-attention in one pass over each instance: scores, softmax and pooling together.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Kind, Tensor};

use super::gemm::{Linear, Sizes};
use super::math::{dot, dot4, hides_all, softmax, weighted_rows, wide, Element};
use super::memory::{prefetch, split_planes, Views};
use super::team::{self, Kernel};
use super::{applies, dispatch, Scratch, Shape};
use crate::error::{MixError, Result};

/// What [`cross`] computes.
pub(crate) struct CrossPooled {
    /// The weights `(N, H, F)`.
    pub(crate) weights: Tensor,
    /// The pooled inputs `(H + 1, N, D)`, where asked for.
    pub(crate) pooled: Option<Tensor>,
    /// Whether every score (before the mask) was finite.
    pub(crate) finite_scores: bool,
}

/// Cross-attention in one pass: `weights[n, h] = softmax_f(u[h] . x[n, f] + mask[n, f])` (all
/// zero for a row the mask hides entirely, NaN as in PyTorch) and, with `output`, the pooled inputs `pooled[h, n] = sum_f
/// weights[n, h, f] x[n, f]` followed by their mean `pooled[H, n] = mean_f x[n, f]`.
///
/// `x`: `(N, F, D)`, `u`: the key vectors `(H, D)`, `mask`: additive `(N, F)`; returns the
/// weights `(N, H, F)`, with `output` the pooled inputs `(H + 1, N, D)`, and whether every
/// score was finite; `None` where [`applies`] is false.
pub(crate) fn cross(
    x: &Tensor,
    u: &Tensor,
    mask: Option<&Tensor>,
    output: bool,
    scratch: &mut Scratch,
) -> Result<Option<CrossPooled>> {
    let mut tensors = vec![x, u];
    tensors.extend(mask);
    if !applies(&tensors) {
        return Ok(None);
    }
    let (n, f, d) = x.size3()?;
    let heads = u.size()[0];
    let mut weights = scratch.take("weights", &[n, heads, f], x.kind())?;
    let mut pooled = match output {
        true => Some(scratch.take("pooled", &[heads + 1, n, d], x.kind())?),
        false => None,
    };
    let (x, u) = (super::resolved(x)?, super::resolved(u)?);
    let mask = mask.map(super::resolved).transpose()?;
    let (shape, heads) = (Shape::of(n, f, d), heads as usize);
    let finite_scores;
    dispatch!(x.kind(), |T| {
        let mut views = Views::default();
        let (x, u) = (views.read::<T>(&x)?, views.read::<T>(&u)?);
        let m = mask.as_ref().map(|m| views.read::<T>(m)).transpose()?;
        let weights = views.write::<T>(&mut weights)?;
        let pooled = pooled.as_mut().map(|p| views.write::<T>(p)).transpose()?;
        let job = Cross { shape, heads, x, u, m, finite: AtomicBool::new(true) };
        let per = team::part_size(shape.n, shape.f * shape.d * (2 * heads + 1));
        let weight_parts = split_planes(weights, 1, shape.n, heads * shape.f, per);
        let pooled_parts = match pooled {
            Some(pooled) => split_planes(pooled, heads + 1, shape.n, shape.d, per),
            None => weight_parts.iter().map(|_| Vec::new()).collect(),
        };
        let parts = weight_parts.into_iter().zip(pooled_parts).map(|(mut w, p)| (w.remove(0), p));
        team::run(&job, team::ranges(shape.n, per).zip(parts).collect());
        finite_scores = job.finite.into_inner();
    });
    Ok(Some(CrossPooled { weights, pooled, finite_scores }))
}

struct Cross<'a, T> {
    shape: Shape,
    heads: usize,
    x: &'a [T],
    /// The key vectors `(H, D)`.
    u: &'a [T],
    m: Option<&'a [T]>,
    /// Cleared where a score (before the mask) is not finite.
    finite: AtomicBool,
}

impl<'a, T: Element> Kernel for Cross<'a, T> {
    /// The weights of the part's instances, and the planes of its pooled inputs (none where
    /// only the weights were asked for).
    type Part = (&'a mut [T], Vec<&'a mut [T]>);

    #[inline(always)]
    fn run<const FMA: bool, const REGS32: bool>(
        &self,
        range: Range<usize>,
        (weights, mut pooled): Self::Part,
    ) {
        let (Shape { f, d, .. }, heads) = (self.shape, self.heads);
        // Head-major weights, then the uniform weights of the mean.
        let mut rows = vec![T::from_f64(1.0 / f as f64); (heads + 1) * f];
        for (j, i) in range.enumerate() {
            let x = &self.x[i * f * d..(i + 1) * f * d];
            // Four heads at a time: each feature read once for four key vectors.
            let fours = heads / 4 * 4;
            let next = self.x.get((i + 1) * f * d..(i + 2) * f * d);
            for (feature, xf) in x.chunks_exact(d).enumerate() {
                prefetch(next.map(|next| &next[feature * d..(feature + 1) * d]));
                for h in (0..fours).step_by(4) {
                    let u = std::array::from_fn(|k| &self.u[(h + k) * d..(h + k + 1) * d]);
                    let scores = match wide::<T, REGS32>() {
                        true => dot4::<T, FMA, 16>(xf, u),
                        false => dot4::<T, FMA, 8>(xf, u),
                    };
                    for (k, score) in scores.into_iter().enumerate() {
                        rows[(h + k) * f + feature] = score;
                    }
                }
                for h in fours..heads {
                    rows[h * f + feature] = dot::<T, FMA>(&self.u[h * d..(h + 1) * d], xf);
                }
            }
            let head_weights = &mut rows[..heads * f];
            if !head_weights.iter().all(|s| s.is_finite()) {
                self.finite.store(false, Ordering::Relaxed);
            }
            let mask = self.m.map(|m| &m[i * f..(i + 1) * f]);
            let hidden = hides_all(mask);
            for head in head_weights.chunks_exact_mut(f) {
                if let Some(m) = mask {
                    head.iter_mut().zip(m).for_each(|(s, &m)| *s += m);
                }
                softmax(head, hidden);
            }
            weights[j * heads * f..(j + 1) * heads * f].copy_from_slice(head_weights);
            if !pooled.is_empty() {
                weighted_rows::<T, FMA>(&mut pooled, j, &rows, x, d);
            }
        }
    }
}

/// The weights [`cross_small`] reads: the key vectors `(H, D)`, and the value and output
/// projections packed (see [`super::pack`]), `(H, D / H, D)` and `(1, D, D)` with their biases.
pub(crate) struct CrossWeights<'t> {
    pub(crate) keys: &'t Tensor,
    pub(crate) value: &'t Tensor,
    pub(crate) out: &'t Tensor,
}

/// Where [`cross_small`] writes: the mixed vectors (`N D` elements) and the importance (`N F`),
/// each where asked for; contiguous CPU tensors of the input's kind that share no bytes with it.
pub(crate) struct CrossOutputs<'t> {
    pub(crate) mixed: Option<&'t mut Tensor>,
    pub(crate) importance: Option<&'t mut Tensor>,
}

/// A whole cross-attention call on a small inference batch, from the input to the outputs in
/// one pass on this thread, with no libtorch op: the weights as [`cross`] finds them, their
/// mean over the heads (the importance), and the mixed vectors
/// `W_o concat_h(W_v,h pooled_h + b_v,h) + b_o (+ mean_f x with skip)`, where a row that its
/// mask hides entirely pools nothing and gets no value bias.
///
/// `x`: `(N, F, D)` (contiguous, any shape of that many elements); `mask`: `(N, F)`, bool (`true`
/// = hidden) or additive of `x`'s kind. Returns `false`, with the outputs half written, where a
/// score (before the mask) was not finite: PyTorch's op sequence differs there, and the caller
/// takes it instead.
pub(crate) fn cross_small(
    x: &Tensor,
    shape: (i64, i64, i64),
    mask: Option<&Tensor>,
    weights: CrossWeights<'_>,
    skip: bool,
    outputs: CrossOutputs<'_>,
) -> Result<bool> {
    let (n, f, d) = shape;
    let heads = weights.keys.size().first().copied().unwrap_or(0);
    let shape = Shape::of(n, f, d);
    let h = usize::try_from(heads).unwrap_or(0);
    let value = Sizes::of(shape.n, shape.d, shape.d / h.max(1), h);
    let out = Sizes::of(shape.n, shape.d, shape.d, 1);
    let misfit = || MixError::Shape {
        what: "small cross-attention call",
        expected: format!("input ({n}, {f}, {d}) with {heads} heads and outputs to fit"),
        got: x.size(),
    };
    if h == 0 || shape.n == 0 || shape.f == 0 || !shape.d.is_multiple_of(h) {
        return Err(misfit());
    }
    let CrossOutputs { mixed, importance } = outputs;
    let finite;
    dispatch!(x.kind(), |T| {
        let mut views = Views::default();
        let x_data = views.read::<T>(x)?;
        let u = views.read::<T>(weights.keys)?;
        let (w_v, w_o) = (views.read::<T>(weights.value)?, views.read::<T>(weights.out)?);
        // A bool mask becomes additive here, as `MultiheadAttention::additive_mask` makes it.
        let additive: Option<Vec<T>> = match mask {
            Some(mask) if mask.kind() == Kind::Bool => Some(
                views
                    .read_bool(mask)?
                    .iter()
                    .map(|&hidden| if hidden != 0 { T::NEG_INFINITY } else { T::ZERO })
                    .collect(),
            ),
            _ => None,
        };
        let m = match (&additive, mask) {
            (Some(additive), _) => Some(additive.as_slice()),
            (None, Some(mask)) => Some(views.read::<T>(mask)?),
            (None, None) => None,
        };
        let mixed = mixed.map(|t| views.write::<T>(t)).transpose()?;
        let importance = importance.map(|t| views.write::<T>(t)).transpose()?;
        // The lengths the views found, checked once (the slices' indexing relies on them).
        let fits = x_data.len() == shape.n * shape.f * shape.d
            && u.len() == h * shape.d
            && w_v.len() == value.packed_len()
            && w_o.len() == out.packed_len()
            && m.is_none_or(|m| m.len() == shape.n * shape.f)
            && mixed.as_ref().is_none_or(|t| t.len() == shape.n * shape.d)
            && importance.as_ref().is_none_or(|t| t.len() == shape.n * shape.f);
        if !fits {
            return Err(misfit());
        }
        let x = x_data;
        let cross = Cross { shape, heads: h, x, u, m, finite: AtomicBool::new(true) };
        let job = CrossSmall { cross, value, out, w_v, w_o, skip };
        let part = (mixed.unwrap_or_default(), importance.unwrap_or_default());
        team::run(&job, vec![(0..shape.n, part)]);
        finite = job.cross.finite.into_inner();
    });
    Ok(finite)
}

struct CrossSmall<'a, T> {
    cross: Cross<'a, T>,
    /// The sizes of the value and the output projection.
    value: Sizes,
    out: Sizes,
    w_v: &'a [T],
    w_o: &'a [T],
    skip: bool,
}

impl<'a, T: Element> Kernel for CrossSmall<'a, T> {
    /// The mixed vectors and the importance; empty where not asked for.
    type Part = (&'a mut [T], &'a mut [T]);

    #[inline(always)]
    fn run<const FMA: bool, const REGS32: bool>(
        &self,
        range: Range<usize>,
        (mixed, importance): Self::Part,
    ) {
        let (Shape { n, f, d }, heads) = (self.cross.shape, self.cross.heads);
        let output = !mixed.is_empty();
        let mut weights = vec![T::ZERO; n * heads * f];
        let mut pooled = vec![T::ZERO; if output { (heads + 1) * n * d } else { 0 }];
        let planes = pooled.chunks_exact_mut((n * d).max(1)).collect();
        self.cross.run::<FMA, REGS32>(range.clone(), (&mut weights[..], planes));
        if !self.cross.finite.load(Ordering::Relaxed) {
            return;
        }
        let h = T::from_f64(heads as f64);
        for (weights, importance) in weights.chunks_exact(heads * f).zip(importance.chunks_mut(f)) {
            for (feature, slot) in importance.iter_mut().enumerate() {
                let total =
                    (0..heads).fold(T::ZERO, |total, head| total + weights[head * f + feature]);
                *slot = total / h;
            }
        }
        if !output {
            return;
        }
        let (pooled, mean) = pooled.split_at(heads * n * d);
        let mut concat = vec![T::ZERO; n * d];
        let value = Linear { sizes: self.value, x: pooled, shared: false, w: self.w_v, add: None };
        value.run::<FMA, REGS32>(range.clone(), &mut concat[..]);
        if let Some(m) = self.cross.m {
            // A row hidden entirely pools nothing, its value bias included.
            for (row, m) in concat.chunks_exact_mut(d).zip(m.chunks_exact(f)) {
                if hides_all(Some(m)) {
                    row.iter_mut().for_each(|v| *v = T::ZERO);
                }
            }
        }
        let add = self.skip.then_some(mean);
        let out = Linear { sizes: self.out, x: &concat, shared: true, w: self.w_o, add };
        out.run::<FMA, REGS32>(range, mixed);
    }
}
