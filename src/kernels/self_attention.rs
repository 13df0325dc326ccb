//! Self-attention's weights averaged over the queries, from its projected queries and keys.

use std::ops::Range;

use tch::Tensor;

use super::math::{axpy, hides_all, madd, slab, softmax, Element, SLAB};
use super::memory::{split_planes, Views};
use super::team::{self, Kernel};
use super::{applies, dispatch, Scratch, Shape};
use crate::error::Result;

/// Self-attention weights averaged over the queries:
/// `b[n, h, j] = mean_i softmax_j((q[n, i, h] scale) . k[n, j, h] + mask[n, j])`, all-zero for a
/// row the mask hides entirely, NaN as in PyTorch.
///
/// `qk`: the queries and keys `(N, F, 2 D)`, heads of `D / H` each; `mask`: additive `(N, F)`;
/// returns `(N, H, F)`, or `None` where [`applies`] is false.
pub(crate) fn self_weights(
    qk: &Tensor,
    heads: i64,
    scale: f64,
    mask: Option<&Tensor>,
    scratch: &mut Scratch,
) -> Result<Option<Tensor>> {
    let mut tensors = vec![qk];
    tensors.extend(mask);
    if !applies(&tensors) {
        return Ok(None);
    }
    let (n, f, two_d) = qk.size3()?;
    let mut weights = scratch.take("weights", &[n, heads, f], qk.kind())?;
    let qk = super::resolved(qk)?;
    let mask = mask.map(super::resolved).transpose()?;
    let (shape, heads) = (Shape::of(n, f, two_d / 2), heads as usize);
    dispatch!(qk.kind(), |T| {
        let mut views = Views::default();
        let qk = views.read::<T>(&qk)?;
        let m = mask.as_ref().map(|m| views.read::<T>(m)).transpose()?;
        let weights = views.write::<T>(&mut weights)?;
        let job = SelfWeights { shape, heads, qk, scale: T::from_f64(scale), m };
        let per =
            team::part_size(shape.n, heads * shape.f * (shape.f * (shape.d / heads) + shape.f));
        let parts = split_planes(weights, 1, shape.n, heads * shape.f, per);
        let parts = parts.into_iter().map(|mut part| part.remove(0));
        team::run(&job, team::ranges(shape.n, per).zip(parts).collect());
    });
    Ok(Some(weights))
}

struct SelfWeights<'a, T> {
    /// `d` is the model width `D`; the rows of `qk` are `2 D` wide.
    shape: Shape,
    heads: usize,
    qk: &'a [T],
    scale: T,
    m: Option<&'a [T]>,
}

impl<'a, T: Element> Kernel for SelfWeights<'a, T> {
    /// The weights `(H, F)` of the part's instances.
    type Part = &'a mut [T];

    #[inline(always)]
    fn run<const FMA: bool, const REGS32: bool>(&self, range: Range<usize>, weights: Self::Part) {
        let (Shape { f, d, .. }, heads) = (self.shape, self.heads);
        let hd = d / heads;
        let inv = T::from_f64(1.0 / f as f64);
        // One head's keys of one instance transposed, `hd x F`, padded to whole slabs of
        // features (the padding stays zero): the scores of a slab of queries against a slab of
        // keys are then independent sums of `hd` products, one vector register per query.
        let padded = f.div_ceil(SLAB) * SLAB;
        let mut keys = vec![T::ZERO; hd * padded];
        let mut queries = vec![T::ZERO; SLAB * hd];
        // The scores of one slab of queries against every key: memory in proportion to the
        // instance's features, never to their square.
        let mut scores = vec![T::ZERO; SLAB * padded];
        for (j, i) in range.enumerate() {
            let qk = &self.qk[i * f * 2 * d..(i + 1) * f * 2 * d];
            let mask = self.m.map(|m| &m[i * f..(i + 1) * f]);
            let hidden = hides_all(mask);
            let out = &mut weights[j * heads * f..(j + 1) * heads * f];
            out.iter_mut().for_each(|o| *o = T::ZERO);
            for (h, mean) in out.chunks_exact_mut(f).enumerate() {
                // The keys transposed into the padded buffer, from the instance's rows in L1.
                for (feature, row) in qk.chunks_exact(2 * d).enumerate() {
                    for (e, &k) in row[d + h * hd..d + (h + 1) * hd].iter().enumerate() {
                        keys[e * padded + feature] = k;
                    }
                }
                for qb in (0..padded).step_by(SLAB) {
                    // A slab of queries, scaled first as PyTorch scales them (which decides
                    // where huge scores overflow). Rows past the last query (padding) repeat
                    // it; their scores are not used.
                    for (r, q) in queries.chunks_exact_mut(hd).enumerate() {
                        let row = &qk[(qb + r).min(f - 1) * 2 * d + h * hd..][..hd];
                        q.iter_mut().zip(row).for_each(|(q, &x)| *q = x * self.scale);
                    }
                    for kb in (0..padded).step_by(SLAB) {
                        let mut acc = [[T::ZERO; SLAB]; SLAB];
                        for (e, k) in keys.chunks_exact(padded).enumerate() {
                            let k = slab(k, kb);
                            for r in 0..SLAB {
                                let q = queries[r * hd + e];
                                for l in 0..SLAB {
                                    acc[r][l] = madd::<T, FMA>(acc[r][l], q, k[l]);
                                }
                            }
                        }
                        for (r, acc) in acc.iter().enumerate() {
                            scores[r * padded + kb..][..SLAB].copy_from_slice(acc);
                        }
                    }
                    for row in scores.chunks_exact_mut(padded).take(f - qb.min(f)) {
                        let row = &mut row[..f];
                        for (key, s) in row.iter_mut().enumerate() {
                            *s += mask.map_or(T::ZERO, |m| m[key]);
                        }
                        softmax(row, hidden);
                        axpy::<T, FMA>(mean, inv, row);
                    }
                }
            }
        }
    }
}
