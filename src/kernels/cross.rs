//! Cross-attention in one pass over each instance: scores, softmax and pooling together.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::Tensor;

use super::math::{dot, dot4, hides_all, softmax, weighted_rows, Element};
use super::memory::{prefetch, split_planes, Views};
use super::team::{self, Kernel};
use super::{applies, dispatch, Scratch, Shape};
use crate::error::Result;

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
                    for (k, score) in dot4::<T, FMA>(xf, u).into_iter().enumerate() {
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
