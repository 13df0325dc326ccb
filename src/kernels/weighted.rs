//! Weighted sums of stacked features, the pooling step of the global and instance weights and
//! of self-attention.

use std::ops::Range;

use tch::Tensor;

use super::math::{self, weighted_rows, Element};
use super::memory::{split_planes, Views};
use super::team::{self, Kernel};
use super::{applies, dispatch, Scratch, Shape};
use crate::error::{MixError, Result};

/// `out[r, n, :] = sum_f (w[n, r, f] + shift) x[n, f, :]` for every row `r` of the weights,
/// plus, with `mean`, one more row `out[R, n, :] = mean_f x[n, f, :]` (swak's skip term).
///
/// `weights`: `(N, R, F)`, or `(R, F)` shared by all instances; `x`: `(N, F, D)`. Returns
/// `(R + mean, N, D)`, row-major for per-head projections; `None` where [`applies`] is false.
pub(crate) fn weighted_sums(
    weights: &Tensor,
    x: &Tensor,
    shift: f64,
    mean: bool,
    scratch: &mut Scratch,
) -> Result<Option<Tensor>> {
    if !applies(&[x, weights]) {
        return Ok(None);
    }
    let (n, f, d) = x.size3()?;
    let rows = weights.size()[weights.dim() - 2];
    let mut out = scratch.take("weighted sums", &[rows + i64::from(mean), n, d], x.kind())?;
    let (x, weights) = (super::resolved(x)?, super::resolved(weights)?);
    let shape = Shape::of(n, f, d);
    let (rows, shared) = (rows as usize, weights.dim() == 2);
    dispatch!(x.kind(), |T| {
        let mut views = Views::default();
        let (x, w) = (views.read::<T>(&x)?, views.read::<T>(&weights)?);
        let out = views.write::<T>(&mut out)?;
        let job = WeightedSums { shape, rows, x, w, shift: T::from_f64(shift), shared, mean };
        let per = team::part_size(shape.n, shape.f * shape.d * (rows + usize::from(mean)));
        let planes = split_planes(out, rows + usize::from(mean), shape.n, shape.d, per);
        team::run(&job, team::ranges(shape.n, per).zip(planes).collect());
    });
    Ok(Some(out))
}

struct WeightedSums<'a, T> {
    shape: Shape,
    /// Rows of weights per instance.
    rows: usize,
    x: &'a [T],
    w: &'a [T],
    shift: T,
    /// Whether one row of weights serves all instances.
    shared: bool,
    /// Whether the mean over the features follows the weighted rows.
    mean: bool,
}

impl<'a, T: Element> Kernel for WeightedSums<'a, T> {
    type Part = Vec<&'a mut [T]>;

    #[inline(always)]
    fn run<const FMA: bool, const REGS32: bool>(
        &self,
        range: Range<usize>,
        mut planes: Self::Part,
    ) {
        let Shape { f, d, .. } = self.shape;
        let rows = self.rows;
        // The weights plus the shift, then the uniform weights of the mean.
        let mut shifted = vec![T::from_f64(1.0 / f as f64); (rows + usize::from(self.mean)) * f];
        for (j, i) in range.enumerate() {
            let x = &self.x[i * f * d..(i + 1) * f * d];
            let w = if self.shared { self.w } else { &self.w[i * rows * f..(i + 1) * rows * f] };
            for (s, &w) in shifted.iter_mut().zip(w) {
                *s = w + self.shift;
            }
            weighted_rows::<T, FMA>(&mut planes, j, &shifted, x, d);
        }
    }
}

/// The global weights mixer's inference in one kernel: the weights `(F,)` (with `normalise`,
/// the softmax of `weights`) into every row of `importance` (`F` elements per row, any number
/// of rows), and into `mixed` the weighted sums `sum_f (w_f + shift) x[n, f, :]` (`N D`
/// elements); each where given. The batch splits over threads as in [`weighted_sums`].
///
/// `x`: `(N, F, D)` as `shape`, contiguous; `mixed` and `importance` contiguous CPU tensors of
/// `x`'s kind that share no bytes with it.
pub(crate) fn global(
    x: &Tensor,
    shape: (i64, i64, i64),
    weights: &Tensor,
    normalise: bool,
    shift: f64,
    mixed: Option<&mut Tensor>,
    importance: Option<&mut Tensor>,
) -> Result<()> {
    let (n, f, d) = shape;
    let shape = Shape::of(n, f, d);
    dispatch!(x.kind(), |T| {
        let mut views = Views::default();
        let (x_data, weights) = (views.read::<T>(x)?, views.read::<T>(weights)?);
        let importance = importance.map(|t| views.write::<T>(t)).transpose()?;
        let mixed = mixed.map(|t| views.write::<T>(t)).transpose()?;
        // The lengths the views found, checked once, before anything is written.
        let fits = shape.f > 0
            && x_data.len() == shape.n * shape.f * shape.d
            && weights.len() == shape.f
            && mixed.as_ref().is_none_or(|m| m.len() == shape.n * shape.d)
            && importance.as_ref().is_none_or(|i| i.len() % shape.f == 0);
        if !fits {
            return Err(MixError::Shape {
                what: "global weights call",
                expected: format!("input ({n}, {f}, {d}) and {f} weights"),
                got: x.size(),
            });
        }
        let x = x_data;
        let mut softmax = weights.to_vec();
        if normalise {
            math::softmax(&mut softmax, false);
        }
        if let Some(importance) = importance {
            for row in importance.chunks_exact_mut(shape.f) {
                row.copy_from_slice(&softmax);
            }
        }
        if let Some(mixed) = mixed {
            let (w, shift) = (&softmax[..], T::from_f64(shift));
            let job = WeightedSums { shape, rows: 1, x, w, shift, shared: true, mean: false };
            let per = team::part_size(shape.n, shape.f * shape.d);
            let planes = split_planes(mixed, 1, shape.n, shape.d, per);
            team::run(&job, team::ranges(shape.n, per).zip(planes).collect());
        }
    });
    Ok(())
}
