//! Weighted sums of stacked features, the pooling step of the global and instance weights and
//! of self-attention.

use std::ops::Range;

use tch::Tensor;

use super::math::{weighted_rows, Element};
use super::memory::{split_planes, Views};
use super::team::{self, Kernel};
use super::{applies, dispatch, Scratch, Shape};
use crate::error::Result;

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
