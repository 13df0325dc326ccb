//! Small matrix products `x W^T + b` against weights packed once, for the batches where MKL's
//! packing of the weights on every call costs as much as the product itself (self-attention's
//! queries and keys of a few instances, the value and output projections of a pooled batch).
//!
//! The weights are packed when the attention mixers derive their cached tensors: in panels of
//! [`PANEL`] columns of `W^T`, each followed by its bias, so that a tile of `R x Q PANEL`
//! outputs is `R` rows of the input times `Q` panels read front to back, its partial sums in
//! vector registers (`R Q` AVX-512 registers of f32, or `2 R Q` AVX2 registers).

use std::ops::Range;

use tch::{Device, Tensor};

use super::math::{madd, wide, Element};
use super::memory::Views;
use super::team::{self, Kernel};
use super::{applies, dispatch};
use crate::error::{MixError, Result};

/// Columns of `W^T` per packed panel: two AVX registers of f32, one AVX-512 register.
const PANEL: usize = 16;

/// Packs `B` blocks of weights `weights` `(B, n, K)`, with their biases `(B, n)` or none, for
/// [`linear`]: `(B, P, K + 1, PANEL)` with `P = ceil(n / PANEL)`, where panel `p` of block `b`
/// holds columns `p PANEL..` of `W_b^T` in its rows `0..K` and of the bias in row `K` (zero
/// past column `n`, and everywhere without a bias).
pub(crate) fn pack(weights: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (blocks, n, k) = weights.size3()?;
    let bias = match bias {
        Some(bias) => bias.f_reshape([blocks, n, 1])?,
        None => Tensor::f_zeros([blocks, n, 1], (weights.kind(), weights.device()))?,
    };
    let panels = (n + PANEL as i64 - 1) / PANEL as i64;
    let augmented = Tensor::f_cat(&[weights, &bias], 2)?; // (B, n, K + 1)
    let padded = augmented.f_constant_pad_nd([0, 0, 0, panels * PANEL as i64 - n])?;
    let panels = padded.f_view([blocks, panels, PANEL as i64, k + 1])?.f_transpose(2, 3)?;
    Ok(panels.f_contiguous()?)
}

/// `y[m, b n + c] = sum_k x_b[m, k] W_b[c, k] + bias_b[c] (+ add[m, b n + c])` for the blocks
/// `b` of the `packed` weights (see [`pack`]), each `n` columns wide: the blocks' outputs side by
/// side.
///
/// `x`: `(M, K)` for every block, or `(B, M, K)`, one per block; `add`: `(M, B n)`. Returns
/// `(M, B n)`, or `None` where [`applies`] is false.
pub(crate) fn linear(
    x: &Tensor,
    packed: &Tensor,
    n: i64,
    add: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let mut tensors = vec![x, packed];
    tensors.extend(add);
    if !applies(&tensors) {
        return Ok(None);
    }
    let (blocks, panels, rows, _) = packed.size4()?;
    let (m, k) = (x.size()[x.dim() - 2], rows - 1);
    // The shapes the slices below rely on, checked (an error, not a panic in a worker thread).
    let expected_x = match x.dim() {
        2 => vec![m, k],
        _ => vec![blocks, m, k],
    };
    let panel = PANEL as i64;
    let fits_panels = (panels - 1) * panel < n && n <= panels * panel;
    if x.size() != expected_x || !fits_panels || add.is_some_and(|a| a.size() != [m, blocks * n]) {
        return Err(MixError::Shape {
            what: "packed product",
            expected: format!("x {expected_x:?} and {n} columns per block of {panels} panels"),
            got: x.size(),
        });
    }
    let mut out = Tensor::f_empty([m, blocks * n], (x.kind(), Device::Cpu))?;
    let (x, packed) = (super::resolved(x)?, super::resolved(packed)?);
    let add = add.map(super::resolved).transpose()?;
    let size = |s: i64| usize::try_from(s).unwrap_or(0);
    let sizes =
        Sizes { m: size(m), k: size(k), n: size(n), blocks: size(blocks), panels: size(panels) };
    let shared = x.dim() == 2;
    dispatch!(x.kind(), |T| {
        let mut views = Views::default();
        let (x, w) = (views.read::<T>(&x)?, views.read::<T>(&packed)?);
        let add = add.as_ref().map(|a| views.read::<T>(a)).transpose()?;
        let out = views.write::<T>(&mut out)?;
        let job = Linear { sizes, x, shared, w, add };
        let width = sizes.blocks * sizes.n;
        let per = team::part_size(sizes.m, sizes.k * width);
        let parts = out.chunks_mut((per * width).max(1));
        team::run(&job, team::ranges(sizes.m, per).zip(parts).collect());
    });
    Ok(Some(out))
}

/// The sizes of a packed product: `M x K` inputs, `blocks` blocks of `n` output columns.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizes {
    /// Rows of the input.
    pub(super) m: usize,
    /// Columns of the input (the weights' rows).
    pub(super) k: usize,
    /// Output columns per block.
    pub(super) n: usize,
    pub(super) blocks: usize,
    /// Panels per block.
    pub(super) panels: usize,
}

impl Sizes {
    /// The sizes of a product of `m x k` inputs with `blocks` blocks of `n` columns.
    pub(super) fn of(m: usize, k: usize, n: usize, blocks: usize) -> Self {
        Self { m, k, n, blocks, panels: n.div_ceil(PANEL) }
    }

    /// The elements of the packed weights of these sizes (see [`pack`]).
    pub(super) fn packed_len(self) -> usize {
        self.blocks * self.panels * (self.k + 1) * PANEL
    }
}

/// [`linear`] over slices: `x` `(M, K)` (`shared`) or `(B, M, K)`, `w` packed, `add` `(M, B n)`;
/// writes `(M, B n)`. The slices' lengths must fit the sizes.
pub(super) struct Linear<'a, T> {
    pub(super) sizes: Sizes,
    pub(super) x: &'a [T],
    /// Whether one input serves every block.
    pub(super) shared: bool,
    pub(super) w: &'a [T],
    pub(super) add: Option<&'a [T]>,
}

impl<'a, T: Element> Kernel for Linear<'a, T> {
    /// The part's rows of the output.
    type Part = &'a mut [T];

    #[inline(always)]
    fn run<const FMA: bool, const REGS32: bool>(&self, range: Range<usize>, out: Self::Part) {
        let Sizes { m, k, n, blocks, panels } = self.sizes;
        let width = blocks * n;
        // Rows per group: two registers of partial sums per row of f32 in the AVX2 build, four
        // per row of f64, eight registers in all (as many independent sums as the multiply-add
        // units overlap). A tile is one group, or two of f32 in the AVX-512 build, whose eight
        // rows take two panels at a time in sixteen registers: each panel is read once per
        // eight rows.
        let group = if std::mem::size_of::<T>() == 4 { 4 } else { 2 };
        let groups = if wide::<T, REGS32>() { 2 } else { 1 };
        // Each group's rows of the input interleaved (`K x R`), so that a tile reads them in
        // the order it reads its panels.
        let mut tile_x = vec![T::ZERO; k * (group * groups).min(range.len())];
        let panel_len = (k + 1) * PANEL;
        for start in range.clone().step_by(group * groups) {
            let count = (range.end - start).min(group * groups);
            let counts = |g: usize| count.saturating_sub(g * group).min(group);
            for b in 0..blocks {
                if b == 0 || !self.shared {
                    let x = if self.shared { self.x } else { &self.x[b * m * k..(b + 1) * m * k] };
                    for r in 0..count {
                        let (g, c) = (r / group, counts(r / group));
                        let row = &x[(start + r) * k..(start + r + 1) * k];
                        let tile = &mut tile_x[g * group * k..][..k * c];
                        for (e, &v) in row.iter().enumerate() {
                            tile[e * c + r % group] = v;
                        }
                    }
                }
                let xs = |g: usize| &tile_x[g * group * k..][..k * counts(g)];
                let panel = |p: usize| &self.w[(b * panels + p) * panel_len..][..panel_len];
                let place = |g: usize, p: usize| Place {
                    first: start - range.start + g * group,
                    start: start + g * group,
                    width,
                    column: b * n + p * PANEL,
                    end: (b + 1) * n,
                };
                let mut p = 0;
                if groups == 2 && count == 2 * group {
                    while panels - p >= 2 {
                        let sums = product8x2::<T, FMA>([xs(0), xs(1)], [panel(p), panel(p + 1)]);
                        place(0, p).write(&mut *out, self.add, sums);
                        p += 2;
                    }
                }
                for g in (0..groups).filter(|&g| counts(g) > 0) {
                    let (x, out) = (xs(g), &mut *out);
                    self.group::<FMA, REGS32>(x, counts(g), p..panels, panel, |p| place(g, p), out);
                }
            }
        }
    }
}

impl<T: Element> Linear<'_, T> {
    /// The panels `panels` of `count` rows of the input (`x`, interleaved), written where
    /// `place` says: four rows take two panels at a time in the AVX-512 build, one row four,
    /// other groups one.
    #[inline(always)]
    fn group<'w, const FMA: bool, const REGS32: bool>(
        &self,
        x: &[T],
        count: usize,
        panels: Range<usize>,
        panel: impl Fn(usize) -> &'w [T],
        place: impl Fn(usize) -> Place,
        out: &mut [T],
    ) where
        T: 'w,
    {
        // (Two rows of two panels, and the generic product of four rows and two panels,
        // compiled to scalar code, 5x-10x slower than one panel at a time.)
        let mut p = panels.start;
        while p < panels.end {
            let q = match (count, panels.end - p) {
                (1, 4..) => 4,
                (4, 2..) if wide::<T, REGS32>() => 2,
                _ => 1,
            };
            let (place, add) = (place(p), self.add);
            let out = &mut *out;
            match (count, q) {
                (4, 2) => place.write(out, add, product4x2::<T, FMA>(x, [panel(p), panel(p + 1)])),
                (4, _) => place.write(out, add, product::<T, FMA, 4, 1>(x, [panel(p)])),
                (3, _) => place.write(out, add, product::<T, FMA, 3, 1>(x, [panel(p)])),
                (2, _) => place.write(out, add, product::<T, FMA, 2, 1>(x, [panel(p)])),
                (_, 4) => {
                    let sums = product::<T, FMA, 1, 4>(x, [0, 1, 2, 3].map(|i| panel(p + i)));
                    place.write(out, add, sums)
                }
                _ => place.write(out, add, product::<T, FMA, 1, 1>(x, [panel(p)])),
            }
            p += q;
        }
    }
}

/// Where a tile's sums go in a part's output.
#[derive(Clone, Copy)]
struct Place {
    /// The tile's first row in the part.
    first: usize,
    /// The tile's first row in the whole output (the rows of `add`).
    start: usize,
    /// Columns of the output.
    width: usize,
    /// The tile's first column.
    column: usize,
    /// The end of the block's columns, where the last panel's padding is cut off.
    end: usize,
}

impl Place {
    /// Writes the sums of `R` rows and `Q` panels to `out`, plus `add`'s elements where there
    /// is one.
    #[inline(always)]
    fn write<T: Element, const R: usize, const Q: usize>(
        self,
        out: &mut [T],
        add: Option<&[T]>,
        sums: [[[T; PANEL]; R]; Q],
    ) {
        for (q, sums) in sums.iter().enumerate() {
            let column = self.column + q * PANEL;
            let cols = (column + PANEL).min(self.end) - column;
            for (r, sums) in sums.iter().enumerate() {
                let at = (self.first + r) * self.width + column;
                let out = &mut out[at..at + cols];
                out.copy_from_slice(&sums[..cols]);
                if let Some(add) = add {
                    let at = (self.start + r) * self.width + column;
                    out.iter_mut().zip(&add[at..at + cols]).for_each(|(o, &a)| *o += a);
                }
            }
        }
    }
}

/// `R` rows of the input (interleaved, `K x R`) times `Q` panels (`K` rows of [`PANEL`], then
/// the bias): the bias plus the sums of products, in `Q x R x PANEL` independent chains.
#[inline(always)]
fn product<T: Element, const FMA: bool, const R: usize, const Q: usize>(
    x: &[T],
    panels: [&[T]; Q],
) -> [[[T; PANEL]; R]; Q] {
    let k = x.len() / R;
    let panels = panels.map(|panel| &panel[..(k + 1) * PANEL]);
    let mut acc = [[[T::ZERO; PANEL]; R]; Q];
    for (acc, panel) in acc.iter_mut().zip(panels) {
        for acc in acc.iter_mut() {
            acc.copy_from_slice(&panel[k * PANEL..]);
        }
    }
    for (e, x) in x.chunks_exact(R).enumerate() {
        for q in 0..Q {
            let w: &[T; PANEL] = panels[q][e * PANEL..(e + 1) * PANEL].try_into().expect("a row");
            for r in 0..R {
                for l in 0..PANEL {
                    acc[q][r][l] = madd::<T, FMA>(acc[q][r][l], x[r], w[l]);
                }
            }
        }
    }
    acc
}

/// [`product`] of four rows and two panels, in eight chains of 16 lanes, one AVX-512 register
/// each: for the f32 builds with 32 registers (the generic form of this size compiles to scalar
/// code, its sums kept in memory).
#[inline(always)]
fn product4x2<T: Element, const FMA: bool>(x: &[T], panels: [&[T]; 2]) -> [[[T; PANEL]; 4]; 2] {
    let k = x.len() / 4;
    let [p, q] = panels.map(|panel| &panel[..(k + 1) * PANEL]);
    let (bias_p, bias_q) = (&p[k * PANEL..], &q[k * PANEL..]);
    let (bias_p, bias_q): (&[T; PANEL], &[T; PANEL]) =
        (bias_p.try_into().expect("a bias row"), bias_q.try_into().expect("a bias row"));
    // Named accumulators, each one register: indexing an array of them by a loop variable
    // would keep them in memory.
    let ([mut a0, mut a1, mut a2, mut a3], [mut b0, mut b1, mut b2, mut b3]) =
        ([*bias_p; 4], [*bias_q; 4]);
    let rows = x.chunks_exact(4).zip(p.chunks_exact(PANEL).zip(q.chunks_exact(PANEL)));
    for (x, (u, v)) in rows {
        let (x0, x1, x2, x3) = (x[0], x[1], x[2], x[3]);
        for l in 0..PANEL {
            a0[l] = madd::<T, FMA>(a0[l], x0, u[l]);
            a1[l] = madd::<T, FMA>(a1[l], x1, u[l]);
            a2[l] = madd::<T, FMA>(a2[l], x2, u[l]);
            a3[l] = madd::<T, FMA>(a3[l], x3, u[l]);
            b0[l] = madd::<T, FMA>(b0[l], x0, v[l]);
            b1[l] = madd::<T, FMA>(b1[l], x1, v[l]);
            b2[l] = madd::<T, FMA>(b2[l], x2, v[l]);
            b3[l] = madd::<T, FMA>(b3[l], x3, v[l]);
        }
    }
    [[a0, a1, a2, a3], [b0, b1, b2, b3]]
}

/// [`product`] of eight rows (two groups of four, each interleaved) and two panels, in sixteen
/// chains of 16 lanes, one AVX-512 register each: each panel row read once for eight rows.
#[inline(always)]
fn product8x2<T: Element, const FMA: bool>(
    x: [&[T]; 2],
    panels: [&[T]; 2],
) -> [[[T; PANEL]; 8]; 2] {
    let k = x[0].len() / 4;
    let [p, q] = panels.map(|panel| &panel[..(k + 1) * PANEL]);
    let (bias_p, bias_q): (&[T; PANEL], &[T; PANEL]) = (
        p[k * PANEL..].try_into().expect("a bias row"),
        q[k * PANEL..].try_into().expect("a bias row"),
    );
    // Named accumulators, each one register: indexing an array of them by a loop variable
    // would keep them in memory.
    let ([mut a0, mut a1, mut a2, mut a3], [mut a4, mut a5, mut a6, mut a7]) =
        ([*bias_p; 4], [*bias_p; 4]);
    let ([mut b0, mut b1, mut b2, mut b3], [mut b4, mut b5, mut b6, mut b7]) =
        ([*bias_q; 4], [*bias_q; 4]);
    let xs = x[0][..4 * k].chunks_exact(4).zip(x[1][..4 * k].chunks_exact(4));
    for ((x, y), (u, v)) in xs.zip(p.chunks_exact(PANEL).zip(q.chunks_exact(PANEL))) {
        let (x0, x1, x2, x3) = (x[0], x[1], x[2], x[3]);
        let (x4, x5, x6, x7) = (y[0], y[1], y[2], y[3]);
        for l in 0..PANEL {
            a0[l] = madd::<T, FMA>(a0[l], x0, u[l]);
            a1[l] = madd::<T, FMA>(a1[l], x1, u[l]);
            a2[l] = madd::<T, FMA>(a2[l], x2, u[l]);
            a3[l] = madd::<T, FMA>(a3[l], x3, u[l]);
            a4[l] = madd::<T, FMA>(a4[l], x4, u[l]);
            a5[l] = madd::<T, FMA>(a5[l], x5, u[l]);
            a6[l] = madd::<T, FMA>(a6[l], x6, u[l]);
            a7[l] = madd::<T, FMA>(a7[l], x7, u[l]);
            b0[l] = madd::<T, FMA>(b0[l], x0, v[l]);
            b1[l] = madd::<T, FMA>(b1[l], x1, v[l]);
            b2[l] = madd::<T, FMA>(b2[l], x2, v[l]);
            b3[l] = madd::<T, FMA>(b3[l], x3, v[l]);
            b4[l] = madd::<T, FMA>(b4[l], x4, v[l]);
            b5[l] = madd::<T, FMA>(b5[l], x5, v[l]);
            b6[l] = madd::<T, FMA>(b6[l], x6, v[l]);
            b7[l] = madd::<T, FMA>(b7[l], x7, v[l]);
        }
    }
    [[a0, a1, a2, a3, a4, a5, a6, a7], [b0, b1, b2, b3, b4, b5, b6, b7]]
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// Asserts `got` within the rounding any order of sums allows of `x w^T + b (+ add)`:
    /// `|got - exact| <= 2 gamma(k + 2) (|x| |w|^T + |b| + |add|)`, with `gamma(n) = n u / (1 - n u)`
    /// and `u` the dtype's unit roundoff, against the product computed in f64 (for f64 itself
    /// rounded by as much, hence the factor 2). The bound holds for every CPU and blocking;
    /// one wrong weight or a dropped bias is far outside it.
    fn assert_rounded(
        what: &str,
        got: &Tensor,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        add: Option<&Tensor>,
    ) {
        let double = |t: &Tensor| t.to_kind(Kind::Double);
        let (x, w) = (double(x), double(w));
        let (b, add) = (b.map(double), add.map(double));
        let mut exact = x.linear(&w, b.as_ref());
        let mut magnitude = x.abs().linear(&w.abs(), b.as_ref().map(Tensor::abs).as_ref());
        if let Some(add) = &add {
            exact += add;
            magnitude += add.abs();
        }
        let u = match got.kind() {
            Kind::Double => f64::EPSILON / 2.0,
            _ => f64::from(f32::EPSILON) / 2.0,
        };
        let terms = (x.size()[x.dim() - 1] + 2) as f64;
        let gamma = terms * u / (1.0 - terms * u);
        let off = (double(got) - &exact).abs() - magnitude * (2.0 * gamma);
        let worst = if off.numel() == 0 { f64::NEG_INFINITY } else { off.max().double_value(&[]) };
        assert!(worst <= 0.0, "{what}: {worst:.1e} over the rounding bound");
    }

    /// Every shape of tile (1 to 8 rows; one, two or four panels at a time) and of the last
    /// panel, shared and per-block inputs, with and without bias and addend, against the exact
    /// product's rounding bound, in f64 and f32.
    #[test]
    fn packed_products_equal_linear() {
        tch::manual_seed(5);
        let _guard = tch::no_grad_guard();
        for kind in [Kind::Double, Kind::Float] {
            let shapes =
                [(1, 1, 1, 1), (5, 7, 3, 2), (16, 33, 40, 2), (9, 64, 16, 3), (1, 8, 70, 1)];
            for (m, k, n, blocks) in shapes.into_iter().chain([
                (3, 8, 70, 2),
                (6, 5, 33, 1),
                (7, 20, 17, 1),
                (23, 9, 16, 2),
            ]) {
                let opts = (kind, Device::Cpu);
                let w = Tensor::randn([blocks, n, k], opts);
                for bias in [None, Some(Tensor::randn([blocks, n], opts))] {
                    let packed = pack(&w, bias.as_ref()).unwrap();
                    for shared in [true, false] {
                        let x = match shared {
                            true => Tensor::randn([m, k], opts),
                            false => Tensor::randn([blocks, m, k], opts),
                        };
                        let add = Tensor::randn([m, blocks * n], opts);
                        let what = format!("{kind:?} {m} {k} {n} {blocks}");
                        let got = linear(&x, &packed, n, None).unwrap().unwrap();
                        let with_add = linear(&x, &packed, n, Some(&add)).unwrap().unwrap();
                        for b in 0..blocks {
                            let x = if shared { x.shallow_clone() } else { x.get(b) };
                            let (w, bias) = (w.get(b), bias.as_ref().map(|bias| bias.get(b)));
                            let cols = |t: &Tensor| t.narrow(1, b * n, n);
                            let add = cols(&add);
                            assert_rounded(&what, &cols(&got), &x, &w, bias.as_ref(), None);
                            let what = format!("{what} with add");
                            assert_rounded(
                                &what,
                                &cols(&with_add),
                                &x,
                                &w,
                                bias.as_ref(),
                                Some(&add),
                            );
                        }
                    }
                }
            }
        }
    }

    /// Inputs that do not fit the packed weights are errors, not panics.
    #[test]
    fn mismatched_shapes_are_errors() {
        let _guard = tch::no_grad_guard();
        let opts = (Kind::Float, Device::Cpu);
        let packed = pack(&Tensor::randn([2, 20, 8], opts), None).unwrap();
        assert!(linear(&Tensor::randn([3, 7], opts), &packed, 20, None).is_err(), "K");
        assert!(linear(&Tensor::randn([3, 3, 8], opts), &packed, 20, None).is_err(), "blocks");
        assert!(linear(&Tensor::randn([3, 8], opts), &packed, 40, None).is_err(), "columns");
        let add = Tensor::randn([3, 20], opts);
        assert!(linear(&Tensor::randn([3, 8], opts), &packed, 20, Some(&add)).is_err(), "add");
        assert!(linear(&Tensor::randn([3, 8], opts), &packed, 20, None).unwrap().is_some());
    }

    /// NaN and infinities reach the outputs they touch, as in a GEMM.
    #[test]
    fn non_finite_inputs_reach_their_outputs() {
        let _guard = tch::no_grad_guard();
        let w = Tensor::ones([1, 3, 2], (Kind::Float, Device::Cpu));
        let packed = pack(&w, None).unwrap();
        let x = Tensor::from_slice(&[f32::NAN, 1.0, f32::INFINITY, 1.0, 1.0, 1.0]).view([3, 2]);
        let y =
            Vec::<f32>::try_from(linear(&x, &packed, 3, None).unwrap().unwrap().view(-1)).unwrap();
        assert!(y[..3].iter().all(|v| v.is_nan()));
        assert!(y[3..6].iter().all(|&v| v == f32::INFINITY));
        assert_eq!(y[6..], [2.0; 3]);
    }
}
