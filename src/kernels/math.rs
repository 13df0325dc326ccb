//! The arithmetic the kernels share: the element types, dot products in independent chains of
//! sums (which the compiler keeps in vector registers), the softmax, and weighted sums of rows.
//! All of it is `#[inline(always)]`, so that it is compiled into each build of each kernel.

use std::ops::{Add, AddAssign, Div, Mul, Sub};

use tch::Kind;

/// f32 or f64.
pub(crate) trait Element:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
    + 'static
{
    /// The libtorch dtype of this element type.
    const KIND: Kind;
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn from_f64(value: f64) -> Self;
    /// `e^self`, within two units in the last place.
    fn exp(self) -> Self;
    fn is_finite(self) -> bool;
    /// `self * a + b`, rounded once.
    fn mul_add(self, a: Self, b: Self) -> Self;
}

impl Element for f32 {
    const KIND: Kind = Kind::Float;
    const ZERO: Self = 0.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    /// [`exp_f32`]: vectorisable, where libm's `expf` is one call per element.
    fn exp(self) -> Self {
        exp_f32(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
}

/// `e^x` in f32 without branches or calls, so that loops over it vectorise: `x = n ln 2 + r`
/// with `|r| <= ln 2 / 2` (Cody and Waite's two-part `ln 2`), `e^r` by its Taylor polynomial of
/// degree 7 (truncation below 1e-8 relative), times `2^n` built from its bits, in two factors
/// where the result is subnormal. Within 2 ulp of `e^x` (checked against f64 in the tests);
/// `e^-inf = 0`, `e^inf = inf` and NaN stays NaN, as libm's.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // few bits, so that `n LN2_HI` is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-104.0, 89.0); // NaN stays NaN
    let n = (clamped * std::f32::consts::LOG2_E).round_ties_even();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // `2^n = 2^a 2^b` with `2^a` normal (`-126 <= a <= 127`) and `b = n - a` in `[-24, 1]`.
    let a = n.clamp(-126.0, 127.0);
    let b = (n - a).max(-30.0);
    let power = |e: f32| f32::from_bits(((e as i32 + 127) as u32) << 23);
    let y = p * power(b) * power(a);
    if x > 88.8 {
        f32::INFINITY
    } else if x < -104.0 {
        0.0
    } else {
        y
    }
}

impl Element for f64 {
    const KIND: Kind = Kind::Double;
    const ZERO: Self = 0.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn from_f64(value: f64) -> Self {
        value
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
}

/// Whether the kernels' chains of sums take 16 lanes of `T` rather than 8: for f32 in the builds
/// with AVX-512 (`REGS32`), where 16 lanes fill one register (8 fill half of it). f64's 8 lanes
/// fill one AVX-512 register already.
#[inline(always)]
pub(crate) fn wide<T: Element, const REGS32: bool>() -> bool {
    REGS32 && std::mem::size_of::<T>() == 4
}

/// The sum of the `L` lanes of `v` (a power of two), halves added pairwise: shuffles and vector
/// adds, where a running sum would be `L` dependent scalar adds.
#[inline(always)]
pub(crate) fn hsum<T: Element, const L: usize>(mut v: [T; L]) -> T {
    debug_assert!(L.is_power_of_two(), "{L} lanes");
    let mut width = L / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// `sum_i a[i] b[i]`, in four independent 8-lane partial sums, small enough for the compiler to
/// keep in vector registers.
#[inline(always)]
pub(crate) fn dot<T: Element, const FMA: bool>(a: &[T], b: &[T]) -> T {
    let (mut s0, mut s1, mut s2, mut s3) = ([T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8]);
    let (a_body, b_body) = (a.chunks_exact(32), b.chunks_exact(32));
    let (a_tail, b_tail) = (a_body.remainder(), b_body.remainder());
    for (a, b) in a_body.zip(b_body) {
        for l in 0..8 {
            s0[l] = madd::<T, FMA>(s0[l], a[l], b[l]);
            s1[l] = madd::<T, FMA>(s1[l], a[8 + l], b[8 + l]);
            s2[l] = madd::<T, FMA>(s2[l], a[16 + l], b[16 + l]);
            s3[l] = madd::<T, FMA>(s3[l], a[24 + l], b[24 + l]);
        }
    }
    let mut sum = T::ZERO;
    for (a, b) in a_tail.iter().zip(b_tail) {
        sum += *a * *b;
    }
    sum += hsum(std::array::from_fn::<T, 8, _>(|l| (s0[l] + s1[l]) + (s2[l] + s3[l])));
    sum
}

/// `[w . x[0], .., w . x[3]]`: [`dot`] of one vector with four, `w` read once for all four,
/// in eight independent chains of sums of `L` lanes each (one vector register: see [`wide`]).
#[inline(always)]
pub(crate) fn dot4<T: Element, const FMA: bool, const L: usize>(w: &[T], x: [&[T]; 4]) -> [T; 4] {
    let z = [T::ZERO; L];
    let ([mut s0, mut s1, mut s2, mut s3], [mut t0, mut t1, mut t2, mut t3]) = ([z; 4], [z; 4]);
    let n = w.len() / (2 * L) * (2 * L);
    let [x0, x1, x2, x3] = x.map(|x| &x[..n]);
    let chunks = w[..n].chunks_exact(2 * L).zip(x0.chunks_exact(2 * L)).zip(x1.chunks_exact(2 * L));
    let rest = x2.chunks_exact(2 * L).zip(x3.chunks_exact(2 * L));
    for (((w, a), b), (c, e)) in chunks.zip(rest) {
        for l in 0..L {
            s0[l] = madd::<T, FMA>(s0[l], w[l], a[l]);
            s1[l] = madd::<T, FMA>(s1[l], w[l], b[l]);
            s2[l] = madd::<T, FMA>(s2[l], w[l], c[l]);
            s3[l] = madd::<T, FMA>(s3[l], w[l], e[l]);
            t0[l] = madd::<T, FMA>(t0[l], w[L + l], a[L + l]);
            t1[l] = madd::<T, FMA>(t1[l], w[L + l], b[L + l]);
            t2[l] = madd::<T, FMA>(t2[l], w[L + l], c[L + l]);
            t3[l] = madd::<T, FMA>(t3[l], w[L + l], e[L + l]);
        }
    }
    let mut sums = [T::ZERO; 4];
    for (j, (s, t)) in [(s0, t0), (s1, t1), (s2, t2), (s3, t3)].into_iter().enumerate() {
        for (&w, &x) in w[n..].iter().zip(&x[j][n..]) {
            sums[j] += w * x;
        }
        sums[j] += hsum(std::array::from_fn::<T, L, _>(|l| s[l] + t[l]));
    }
    sums
}

/// `[[w[0] . x[j], w[1] . x[j]] for j in 0..4]`: [`dot`] of two vectors with four, each read
/// once, in eight independent chains of sums (one vector register each, as many as the
/// processor's multiply-add units keep busy), so that the multiply-adds rather than the loads
/// bound it: six loads per eight multiply-adds, where [`dot4`] needs ten.
#[inline(always)]
pub(crate) fn dot4x2<T: Element, const FMA: bool>(w: [&[T]; 2], x: [&[T]; 4]) -> [[T; 2]; 4] {
    let (mut a0, mut a1, mut a2, mut a3) = ([T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8]);
    let (mut b0, mut b1, mut b2, mut b3) = ([T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8]);
    let n = w[0].len() / 8 * 8;
    let ([w0, w1], [x0, x1, x2, x3]) = (w.map(|w| &w[..n]), x.map(|x| &x[..n]));
    let ws = w0.chunks_exact(8).zip(w1.chunks_exact(8));
    let xs =
        x0.chunks_exact(8).zip(x1.chunks_exact(8)).zip(x2.chunks_exact(8).zip(x3.chunks_exact(8)));
    for ((u, v), ((p, q), (r, s))) in ws.zip(xs) {
        for l in 0..8 {
            a0[l] = madd::<T, FMA>(a0[l], u[l], p[l]);
            b0[l] = madd::<T, FMA>(b0[l], v[l], p[l]);
            a1[l] = madd::<T, FMA>(a1[l], u[l], q[l]);
            b1[l] = madd::<T, FMA>(b1[l], v[l], q[l]);
            a2[l] = madd::<T, FMA>(a2[l], u[l], r[l]);
            b2[l] = madd::<T, FMA>(b2[l], v[l], r[l]);
            a3[l] = madd::<T, FMA>(a3[l], u[l], s[l]);
            b3[l] = madd::<T, FMA>(b3[l], v[l], s[l]);
        }
    }
    let acc = [[a0, b0], [a1, b1], [a2, b2], [a3, b3]];
    let mut sums = [[T::ZERO; 2]; 4];
    for (j, (sums, acc)) in sums.iter_mut().zip(&acc).enumerate() {
        for (r, (sum, acc)) in sums.iter_mut().zip(acc).enumerate() {
            for (&w, &x) in w[r][n..].iter().zip(&x[j][n..]) {
                *sum += w * x;
            }
            *sum += hsum(*acc);
        }
    }
    sums
}

/// `[[w[i] . x[j] for i in 0..4] for j in 0..4]` in `L` lanes each (the sum of whose lanes,
/// [`hsum`], is the dot product), so that a caller that sums tiles reduces the lanes once: four
/// vectors with four, each read once, in sixteen independent chains of sums, eight loads per
/// sixteen multiply-adds. The sums and the loads need 24 vector registers: for the builds with
/// 32 (AVX-512VL) only.
#[inline(always)]
pub(crate) fn dot4x4<T: Element, const FMA: bool, const L: usize>(
    w: [&[T]; 4],
    x: [&[T]; 4],
) -> [[[T; L]; 4]; 4] {
    let n = w[0].len() / L * L;
    let ([w0, w1, w2, w3], [x0, x1, x2, x3]) = (w.map(|w| &w[..n]), x.map(|x| &x[..n]));
    let (ws, xs) = (
        pairs::<T, L>(w0, w1).zip(pairs::<T, L>(w2, w3)),
        pairs::<T, L>(x0, x1).zip(pairs::<T, L>(x2, x3)),
    );
    // Named accumulators, each one register: indexing an array of them by a loop variable
    // would keep them in memory.
    let z = [T::ZERO; L];
    let ([mut a0, mut a1, mut a2, mut a3], [mut b0, mut b1, mut b2, mut b3]) = ([z; 4], [z; 4]);
    let ([mut c0, mut c1, mut c2, mut c3], [mut d0, mut d1, mut d2, mut d3]) = ([z; 4], [z; 4]);
    for (((u, v), (y, z)), ((p, q), (r, s))) in ws.zip(xs) {
        for l in 0..L {
            a0[l] = madd::<T, FMA>(a0[l], u[l], p[l]);
            a1[l] = madd::<T, FMA>(a1[l], v[l], p[l]);
            a2[l] = madd::<T, FMA>(a2[l], y[l], p[l]);
            a3[l] = madd::<T, FMA>(a3[l], z[l], p[l]);
            b0[l] = madd::<T, FMA>(b0[l], u[l], q[l]);
            b1[l] = madd::<T, FMA>(b1[l], v[l], q[l]);
            b2[l] = madd::<T, FMA>(b2[l], y[l], q[l]);
            b3[l] = madd::<T, FMA>(b3[l], z[l], q[l]);
            c0[l] = madd::<T, FMA>(c0[l], u[l], r[l]);
            c1[l] = madd::<T, FMA>(c1[l], v[l], r[l]);
            c2[l] = madd::<T, FMA>(c2[l], y[l], r[l]);
            c3[l] = madd::<T, FMA>(c3[l], z[l], r[l]);
            d0[l] = madd::<T, FMA>(d0[l], u[l], s[l]);
            d1[l] = madd::<T, FMA>(d1[l], v[l], s[l]);
            d2[l] = madd::<T, FMA>(d2[l], y[l], s[l]);
            d3[l] = madd::<T, FMA>(d3[l], z[l], s[l]);
        }
    }
    let mut acc = [[a0, a1, a2, a3], [b0, b1, b2, b3], [c0, c1, c2, c3], [d0, d1, d2, d3]];
    for (j, acc) in acc.iter_mut().enumerate() {
        for (i, acc) in acc.iter_mut().enumerate() {
            fold_tail::<T, FMA, L>(acc, &w[i][n..], &x[j][n..]);
        }
    }
    acc
}

/// Adds `w[l] x[l]` to lane `l` of `acc`: the tail of a dot product, shorter than `L`, folded
/// into its lanes.
#[inline(always)]
fn fold_tail<T: Element, const FMA: bool, const L: usize>(acc: &mut [T; L], w: &[T], x: &[T]) {
    for ((acc, &w), &x) in acc.iter_mut().zip(w).zip(x) {
        *acc = madd::<T, FMA>(*acc, w, x);
    }
}

/// The `L`-element chunks of `a` and `b`, side by side.
#[inline(always)]
fn pairs<'a, T, const L: usize>(
    a: &'a [T],
    b: &'a [T],
) -> impl Iterator<Item = (&'a [T], &'a [T])> {
    a.chunks_exact(L).zip(b.chunks_exact(L))
}

/// `acc + a b`: one fused multiply-add where `FMA` (the builds for processors that have it),
/// else a product and a sum.
#[inline(always)]
pub(crate) fn madd<T: Element, const FMA: bool>(acc: T, a: T, b: T) -> T {
    if FMA {
        a.mul_add(b, acc)
    } else {
        acc + a * b
    }
}

/// `o += a * x`.
#[inline(always)]
pub(crate) fn axpy<T: Element, const FMA: bool>(o: &mut [T], a: T, x: &[T]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = madd::<T, FMA>(*o, a, x);
    }
}

/// Softmax of `scores` in place, as PyTorch's: a NaN anywhere, a +inf, or nothing but -inf makes
/// the whole row NaN. A `hidden` row (its mask hides every key) becomes all zeros instead.
#[inline(always)]
pub(crate) fn softmax<T: Element>(scores: &mut [T], hidden: bool) {
    if hidden {
        scores.iter_mut().for_each(|s| *s = T::ZERO);
        return;
    }
    // The maximum, or NaN where any score is NaN (`s != s`), so that NaN reaches every weight.
    #[allow(clippy::eq_op)]
    let max = scores.iter().fold(T::NEG_INFINITY, |m, &s| if s > m || s != s { s } else { m });
    // The exponentials in a loop of their own, which vectorises (a running sum would not).
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
    }
    let total = scores.iter().fold(T::ZERO, |total, &s| total + s);
    for s in scores.iter_mut() {
        *s = *s / total;
    }
}

/// Whether an additive mask row hides every key: all of it -inf. Such a row gets zero weights.
#[inline(always)]
pub(crate) fn hides_all<T: Element>(mask: Option<&[T]>) -> bool {
    mask.is_some_and(|m| m.iter().all(|&v| v == T::NEG_INFINITY))
}

/// Columns of the features one register-blocked step of [`weighted_rows`] covers.
pub(crate) const SLAB: usize = 8;

/// `SLAB` elements of `x` from `start`, as an array (so that loops over it need no bounds checks).
#[inline(always)]
pub(crate) fn slab<T>(x: &[T], start: usize) -> &[T; SLAB] {
    x[start..start + SLAB].try_into().expect("a slab of SLAB elements")
}

/// Weighted sums of the stacked features `x` (`F x D`) of the `j`-th instance of a part, one
/// per row of `weights` (`R x F`): `planes[r][j D..(j + 1) D] = sum_f weights[r F + f] x[f]`.
/// Each slab of `x` is read once for four rows at a time, while their partial sums stay in
/// registers.
#[inline(always)]
pub(crate) fn weighted_rows<T: Element, const FMA: bool>(
    planes: &mut [&mut [T]],
    j: usize,
    weights: &[T],
    x: &[T],
    d: usize,
) {
    let f = x.len() / d.max(1);
    let rows = weights.len() / f.max(1);
    let span = j * d..(j + 1) * d;
    if rows == 1 {
        // One row: blocks of 64 columns, their sums in eight vector registers (eight independent
        // chains) while the features pass, so that nothing is stored before the end.
        let out = &mut planes[0][span];
        let body = d / 64 * 64;
        for c in (0..body).step_by(64) {
            let mut acc = [T::ZERO; 64];
            for (&w, row) in weights.iter().zip(x.chunks_exact(d)) {
                let xs: &[T; 64] = row[c..c + 64].try_into().expect("a block of 64");
                for l in 0..64 {
                    acc[l] = madd::<T, FMA>(acc[l], w, xs[l]);
                }
            }
            out[c..c + 64].copy_from_slice(&acc);
        }
        let out = &mut out[body..];
        out.iter_mut().for_each(|o| *o = T::ZERO);
        for (&w, row) in weights.iter().zip(x.chunks_exact(d)) {
            axpy::<T, FMA>(out, w, &row[body..]);
        }
        return;
    }
    let mut r = 0;
    while r < rows {
        let w = &weights[r * f..];
        let mut outs = planes[r..].iter_mut().map(|plane| &mut plane[span.clone()]);
        let mut next = || outs.next().expect("a plane for every row of weights");
        r += match rows - r {
            1 => weighted_rows_n::<T, FMA, 1>(std::array::from_fn(|_| next()), w, x, d),
            2 => weighted_rows_n::<T, FMA, 2>(std::array::from_fn(|_| next()), w, x, d),
            3 => weighted_rows_n::<T, FMA, 3>(std::array::from_fn(|_| next()), w, x, d),
            _ => weighted_rows_n::<T, FMA, 4>(std::array::from_fn(|_| next()), w, x, d),
        };
    }
}

/// [`weighted_rows`] for `R` rows; returns `R`.
#[inline(always)]
fn weighted_rows_n<T: Element, const FMA: bool, const R: usize>(
    outs: [&mut [T]; R],
    weights: &[T],
    x: &[T],
    d: usize,
) -> usize {
    let f = x.len() / d;
    let weights: [&[T]; R] = std::array::from_fn(|r| &weights[r * f..(r + 1) * f]);
    let body = d / SLAB * SLAB;
    for c in (0..body).step_by(SLAB) {
        let mut acc = [[T::ZERO; SLAB]; R];
        for (feature, row) in x.chunks_exact(d).enumerate() {
            let xs = slab(row, c);
            let ws: [T; R] = std::array::from_fn(|r| weights[r][feature]);
            for (acc, w) in acc.iter_mut().zip(ws) {
                for l in 0..SLAB {
                    acc[l] = madd::<T, FMA>(acc[l], w, xs[l]);
                }
            }
        }
        for r in 0..R {
            outs[r][c..c + SLAB].copy_from_slice(&acc[r]);
        }
    }
    for c in body..d {
        for r in 0..R {
            let column = x.chunks_exact(d).map(|row| row[c]);
            outs[r][c] =
                weights[r].iter().zip(column).fold(T::ZERO, |s, (&w, x)| madd::<T, FMA>(s, w, x));
        }
    }
    R
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_f32` against f64's `exp` rounded to f32, over the whole range and its edges.
    #[test]
    fn exp_f32_is_within_two_ulp() {
        let ulps = |x: f32| {
            let (got, exact) = (exp_f32(x), (x as f64).exp());
            let ulp = (exact as f32).abs().max(f32::from_bits(1));
            let ulp = f32::from_bits(ulp.to_bits() + 1) - ulp;
            ((got as f64 - exact) / ulp as f64).abs()
        };
        let mut worst = 0.0_f64;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = -104.0 + (88.7 + 104.0) * i as f32 / steps as f32;
            worst = worst.max(ulps(x));
        }
        for x in [0.0, -0.0, 1e-30, -1e-30, 88.72, -87.3, -100.0, -103.9, f32::MIN_POSITIVE] {
            worst = worst.max(ulps(x));
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    /// `dot`, `dot4`, `dot4x2` and `dot4x4` (its lanes summed by `hsum`) at 8 and 16 lanes, for
    /// lengths on and off the chunks' multiples, within the rounding any order of sums allows:
    /// `|got - exact| <= gamma(n + 1) sum |w x|`, with the exact sum in f64. One dropped or
    /// doubled term is far outside it.
    #[test]
    fn dot_products_at_every_width_are_within_rounding() {
        let seed = 0x5eed_u64;
        println!("seed {seed}");
        let mut state = seed;
        let mut draw = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let check = |what: &str, got: f32, w: &[f32], x: &[f32]| {
            let exact: f64 = w.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64).sum();
            let magnitude: f64 = w.iter().zip(x).map(|(&w, &x)| (w as f64 * x as f64).abs()).sum();
            let nu = (w.len() + 1) as f64 * f64::from(f32::EPSILON) / 2.0;
            let bound = nu / (1.0 - nu) * magnitude;
            let off = (got as f64 - exact).abs();
            assert!(
                off <= bound,
                "{what} (length {}): {off:.1e} off, {bound:.1e} allowed",
                w.len()
            );
        };
        for len in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 100, 1024, 1031] {
            let mut vector = || (0..len).map(|_| draw()).collect::<Vec<f32>>();
            let w: [Vec<f32>; 4] = std::array::from_fn(|_| vector());
            let x: [Vec<f32>; 4] = std::array::from_fn(|_| vector());
            let (w, x) = (w.each_ref().map(|w| &w[..]), x.each_ref().map(|x| &x[..]));
            check("dot", dot::<f32, true>(w[0], x[0]), w[0], x[0]);
            for (j, &got) in dot4::<f32, true, 8>(w[0], x).iter().enumerate() {
                check("dot4 at 8 lanes", got, w[0], x[j]);
            }
            for (j, &got) in dot4::<f32, false, 16>(w[0], x).iter().enumerate() {
                check("dot4 at 16 lanes", got, w[0], x[j]);
            }
            for (j, sums) in dot4x2::<f32, true>([w[0], w[1]], x).iter().enumerate() {
                for (i, &got) in sums.iter().enumerate() {
                    check("dot4x2", got, w[i], x[j]);
                }
            }
            for (j, lanes) in dot4x4::<f32, true, 8>(w, x).iter().enumerate() {
                for (i, &lanes) in lanes.iter().enumerate() {
                    check("dot4x4 at 8 lanes", hsum(lanes), w[i], x[j]);
                }
            }
            for (j, lanes) in dot4x4::<f32, false, 16>(w, x).iter().enumerate() {
                for (i, &lanes) in lanes.iter().enumerate() {
                    check("dot4x4 at 16 lanes", hsum(lanes), w[i], x[j]);
                }
            }
        }
        let lanes: [f32; 16] = std::array::from_fn(|l| (1 << l) as f32);
        assert_eq!(hsum(lanes), 65_535.0);
    }
}
