//! The InstanceWeightsMixer in one pass over each instance: the projection's scores, the
//! softmax and the weighted sum together.

use std::ops::Range;

use tch::Tensor;

use super::math::{dot, dot4, dot4x2, dot4x4, hsum, softmax, weighted_rows, wide, Element};
use super::memory::{split_planes, Views};
use super::team::{self, Kernel};
use super::{applies, dispatch, Shape};
use crate::error::{MixError, Result};

/// Elements of an instance's flattened features per tile of the kernel.
const TILE: usize = 1024;

/// InstanceWeightsMixer in one pass: `importance[n] = softmax(W x[n].flatten() + b)` and
/// `mixed[n] = sum_f (importance[n, f] + fold) x[n, f]`, where `fold` is `1/F` (skip folded in)
/// or 0. `x`: `(N, F, D)` as `shape` (any strides), `weight`: `(F, F D)`, `bias`: `(F,)`; writes
/// `mixed` (`N D` elements) and `importance` (`N F`), each where given: contiguous CPU tensors
/// of `x`'s kind that share no bytes with the inputs. `false` (nothing written) where
/// [`applies`] is false.
pub(crate) fn instance(
    x: &Tensor,
    shape: (i64, i64, i64),
    weight: &Tensor,
    bias: Option<&Tensor>,
    fold: bool,
    mixed: Option<&mut Tensor>,
    importance: Option<&mut Tensor>,
) -> Result<bool> {
    let applies = match bias {
        Some(bias) => applies(&[x, weight, bias]),
        None => applies(&[x, weight]),
    };
    if !applies {
        return Ok(false);
    }
    let (n, f, d) = shape;
    let shape = Shape::of(n, f, d);
    let size = shape.f * shape.d;
    let misfit = || MixError::Shape {
        what: "instance weights call",
        expected: format!("input ({n}, {f}, {d}), weight ({f}, {})", f * d),
        got: x.size(),
    };
    // Views need contiguous, resolved tensors: copies only where these are not.
    let resolve = |t: &Tensor| -> Result<Option<Tensor>> {
        match t.is_contiguous() && !t.is_neg() {
            true => Ok(None),
            false => super::resolved(t).map(Some),
        }
    };
    let (x_copy, weight_copy) = (resolve(x)?, resolve(weight)?);
    let bias_copy = bias.map(resolve).transpose()?.flatten();
    let x = x_copy.as_ref().unwrap_or(x);
    let weight = weight_copy.as_ref().unwrap_or(weight);
    let bias = bias_copy.as_ref().or(bias);
    let planes = (usize::from(mixed.is_some()), usize::from(importance.is_some()));
    dispatch!(x.kind(), |T| {
        let mut views = Views::default();
        let (x, w) = (views.read::<T>(x)?, views.read::<T>(weight)?);
        let b = bias.map(|b| views.read::<T>(b)).transpose()?;
        let mixed = match mixed {
            Some(mixed) => views.write::<T>(mixed)?,
            None => &mut [],
        };
        let importance = match importance {
            Some(importance) => views.write::<T>(importance)?,
            None => &mut [],
        };
        // The lengths the views found, checked once (the slices' indexing relies on them).
        let fits = x.len() == shape.n * size
            && w.len() == shape.f * size
            && b.is_none_or(|b| b.len() == shape.f)
            && (planes.0 == 0 || mixed.len() == shape.n * shape.d)
            && (planes.1 == 0 || importance.len() == shape.n * shape.f);
        if !fits {
            return Err(misfit());
        }
        let job = Instance { shape, x, w, b, fold };
        let per = team::part_size(shape.n, shape.f * shape.f * shape.d);
        let mixed = split_planes(mixed, planes.0, shape.n, shape.d, per);
        let importance = split_planes(importance, planes.1, shape.n, shape.f, per);
        let importance = importance.into_iter().map(|mut planes| planes.pop().unwrap_or_default());
        team::run(
            &job,
            team::ranges(shape.n, per).zip(mixed.into_iter().zip(importance)).collect(),
        );
    });
    Ok(true)
}

struct Instance<'a, T> {
    shape: Shape,
    x: &'a [T],
    w: &'a [T],
    b: Option<&'a [T]>,
    /// Whether the skip term is folded into the weights.
    fold: bool,
}

impl<'a, T: Element> Kernel for Instance<'a, T> {
    /// The mixed vectors (one plane, none where not asked for) and the importance of the
    /// part's instances (empty where not asked for).
    type Part = (Vec<&'a mut [T]>, &'a mut [T]);

    #[inline(always)]
    fn run<const FMA: bool, const REGS32: bool>(&self, range: Range<usize>, part: Self::Part) {
        match wide::<T, REGS32>() {
            true => self.run_in::<FMA, REGS32, 16>(range, part),
            false => self.run_in::<FMA, REGS32, 8>(range, part),
        }
    }
}

impl<'a, T: Element> Instance<'a, T> {
    /// [`Kernel::run`] with chains of sums `L` lanes wide (see [`wide`]).
    #[inline(always)]
    fn run_in<const FMA: bool, const REGS32: bool, const L: usize>(
        &self,
        range: Range<usize>,
        (mut mixed, importance): <Self as Kernel>::Part,
    ) {
        let Shape { f, d, .. } = self.shape;
        let fold = if self.fold { T::from_f64(1.0 / f as f64) } else { T::ZERO };
        let size = f * d;
        // Four instances at a time, their features in tiles that stay in the L1 cache while
        // every row of the projection (too large for L1 as a whole) passes them: each tile of
        // the projection is then read from L2 once per four instances instead of once per
        // instance.
        let tile = TILE.min(size);
        let mut scores = vec![T::ZERO; 4 * f];
        // The sums of the four-by-four products in lanes, reduced once after the last tile.
        let mut lanes = vec![[T::ZERO; L]; if REGS32 { 4 * f } else { 0 }];
        let mut start = range.start;
        while start < range.end {
            let count = (range.end - start).min(4);
            let x = &self.x[start * size..(start + count) * size];
            for scores in scores.chunks_exact_mut(f).take(count) {
                for (g, score) in scores.iter_mut().enumerate() {
                    *score = self.b.map_or(T::ZERO, |b| b[g]);
                }
            }
            lanes.iter_mut().for_each(|lanes| *lanes = [T::ZERO; L]);
            for t in (0..size).step_by(tile) {
                let end = (t + tile).min(size);
                let rows = |g: usize| &self.w[g * size + t..g * size + end];
                let xs = |j: usize| &x[j * size + t..j * size + end];
                // Four rows of the projection at a time where 16 sums fit in registers with
                // the loads (32 registers), else two.
                let mut g = 0;
                while REGS32 && count == 4 && g + 4 <= f {
                    let w = std::array::from_fn(|i| rows(g + i));
                    let sums = dot4x4::<T, FMA, L>(w, std::array::from_fn(xs));
                    for (j, sums) in sums.iter().enumerate() {
                        add_lanes(&mut lanes[j * f + g..j * f + g + 4], sums);
                    }
                    g += 4;
                }
                while count == 4 && g + 2 <= f {
                    let sums = dot4x2::<T, FMA>([rows(g), rows(g + 1)], std::array::from_fn(xs));
                    for (j, partials) in sums.into_iter().enumerate() {
                        scores[j * f + g] += partials[0];
                        scores[j * f + g + 1] += partials[1];
                    }
                    g += 2;
                }
                // Fewer than four instances: four rows of the projection with each, the
                // instance's tile read once for the four.
                while count < 4 && g + 4 <= f {
                    let w = std::array::from_fn(|i| rows(g + i));
                    for j in 0..count {
                        let partials = dot4::<T, FMA, L>(xs(j), w);
                        scores[j * f + g..j * f + g + 4]
                            .iter_mut()
                            .zip(partials)
                            .for_each(|(s, p)| *s += p);
                    }
                    g += 4;
                }
                for g in g..f {
                    if count == 4 {
                        let sums = dot4::<T, FMA, L>(rows(g), std::array::from_fn(xs));
                        for (j, partial) in sums.into_iter().enumerate() {
                            scores[j * f + g] += partial;
                        }
                    } else {
                        for j in 0..count {
                            scores[j * f + g] += dot::<T, FMA>(rows(g), xs(j));
                        }
                    }
                }
            }
            for (score, lanes) in scores.iter_mut().zip(&lanes).take(count * f) {
                *score += hsum(*lanes);
            }
            let instances = scores.chunks_exact_mut(f).zip(x.chunks_exact(size));
            for (k, (weights, x)) in instances.enumerate() {
                let j = start - range.start + k;
                softmax(weights, false);
                if !importance.is_empty() {
                    importance[j * f..(j + 1) * f].copy_from_slice(weights);
                }
                if !mixed.is_empty() {
                    weights.iter_mut().for_each(|w| *w += fold);
                    weighted_rows::<T, FMA>(&mut mixed, j, weights, x, d);
                }
            }
            start += count;
        }
    }
}

/// Adds each of `sums`' lanes to `lanes`'.
#[inline(always)]
fn add_lanes<T: Element, const L: usize>(lanes: &mut [[T; L]], sums: &[[T; L]]) {
    for (lanes, sums) in lanes.iter_mut().zip(sums) {
        lanes.iter_mut().zip(sums).for_each(|(l, &s)| *l += s);
    }
}
