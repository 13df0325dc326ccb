//! CPU kernels for inference, where a chain of libtorch ops would read the input several times
//! or run one tiny GEMM per instance: each kernel makes one pass over the stacked features of an
//! instance while they sit in the L1 cache (scores, softmax and weighted sums together).
//!
//! They run only where autograd records nothing, on f32/f64 CPU tensors; elsewhere (CUDA,
//! half precision, training) callers use libtorch ops, which the kernels equal up to rounding
//! (the parity fixtures check both). With AVX2 and FMA present they are compiled for them, and
//! they split the batch over `tch::get_num_threads()` threads.

use std::ops::{Add, AddAssign, Div, Mul, Sub};

use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::mixer;

/// Instances per thread below which the work stays on the calling thread.
const MIN_INSTANCES_PER_THREAD: usize = 32;

/// Whether the kernels apply to these tensors: CPU, f32 or f64 alike, nothing for autograd.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    let kind = tensors[0].kind();
    let recording = mixer::grad_mode() && tensors.iter().any(|t| t.requires_grad());
    !recording
        && matches!(kind, Kind::Float | Kind::Double)
        && tensors.iter().all(|t| t.device() == Device::Cpu && t.kind() == kind)
}

/// Weighted sums of stacked features: `out[k, n, :] = sum_f (w[n, k, f] + shift) x[n, f, :]`,
/// plus, with `mean`, one more row `out[K, n, :] = mean_f x[n, f, :]` (swak's skip term).
///
/// `weights`: `(N, K, F)`, or `(K, F)` shared by all instances; `x`: `(N, F, D)`. Returns
/// `(K + mean, N, D)`, head-major for per-head projections; `None` where [`applies`] is false.
pub(crate) fn pool(weights: &Tensor, x: &Tensor, shift: f64, mean: bool) -> Result<Option<Tensor>> {
    if !applies(&[x, weights]) {
        return Ok(None);
    }
    let (n, f, d) = x.size3()?;
    let k = weights.size()[weights.dim() - 2];
    let out = Tensor::f_empty([k + i64::from(mean), n, d], (x.kind(), Device::Cpu))?;
    let (x, weights) = (x.f_contiguous()?, weights.f_contiguous()?);
    let shape = Shape { n: n as usize, f: f as usize, d: d as usize, k: k as usize };
    let shared = weights.dim() == 2;
    dispatch!(x.kind(), |T| {
        let (x, w) = (slice::<T>(&x), slice::<T>(&weights));
        let out = Out::<T>::new(&out);
        let job = PoolJob { shape, x, w, shift: T::from_f64(shift), shared, mean, out };
        parallel(shape.n, |range| run!(pool_range, pool_range_wide, job, range));
    });
    Ok(Some(out))
}

/// InstanceWeightsMixer in one pass: `importance[n] = softmax(W x[n].flatten() + b)` and
/// `mixed[n] = sum_f (importance[n, f] + fold) x[n, f]`, where `fold` is `1/F` (skip folded in)
/// or 0. `x`: `(N, F, D)`, `weight`: `(F, F D)`, `bias`: `(F,)`; returns `((N, D), (N, F))`.
pub(crate) fn instance(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    fold: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let mut tensors = vec![x, weight];
    tensors.extend(bias);
    if !applies(&tensors) {
        return Ok(None);
    }
    let (n, f, d) = x.size3()?;
    let options = (x.kind(), Device::Cpu);
    let (mixed, importance) =
        (Tensor::f_empty([n, d], options)?, Tensor::f_empty([n, f], options)?);
    let (x, weight) = (x.f_contiguous()?, weight.f_contiguous()?);
    let bias = bias.map(Tensor::f_contiguous).transpose()?;
    let shape = Shape { n: n as usize, f: f as usize, d: d as usize, k: 1 };
    dispatch!(x.kind(), |T| {
        let (x, w, b) = (slice::<T>(&x), slice::<T>(&weight), bias.as_ref().map(slice::<T>));
        let (mixed, importance) = (Out::<T>::new(&mixed), Out::<T>::new(&importance));
        let job = InstanceJob { shape, x, w, b, fold, mixed, importance };
        parallel(shape.n, |range| run!(instance_range, instance_range_wide, job, range));
    });
    Ok(Some((mixed, importance)))
}

/// Self-attention weights averaged over the queries: `b[n, h, j] = mean_i softmax_j(q[n, i, h]
/// . k[n, j, h] * scale + mask[n, j])`, all-zero for a fully masked row. `qk`: `(N, F, 2 D)`,
/// queries then keys, heads of `D / H` each; `mask`: additive `(N, F)`; returns `(N, H, F)`.
pub(crate) fn self_weights(
    qk: &Tensor,
    heads: i64,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let mut tensors = vec![qk];
    tensors.extend(mask);
    if !applies(&tensors) {
        return Ok(None);
    }
    let (n, f, two_d) = qk.size3()?;
    let weights = Tensor::f_empty([n, heads, f], (qk.kind(), Device::Cpu))?;
    let qk = qk.f_contiguous()?;
    let mask = mask.map(Tensor::f_contiguous).transpose()?;
    let shape = Shape { n: n as usize, f: f as usize, d: (two_d / 2) as usize, k: heads as usize };
    dispatch!(qk.kind(), |T| {
        let (qk, m) = (slice::<T>(&qk), mask.as_ref().map(slice::<T>));
        let weights = Out::<T>::new(&weights);
        let scale = T::from_f64(scale);
        let job = SelfJob { shape, qk, scale, m, weights };
        parallel(shape.n, |range| run!(self_range, self_range_wide, job, range));
    });
    Ok(Some(weights))
}

/// Runs `$body` with `T` bound to the element type of `$kind` (f32 or f64).
macro_rules! dispatch {
    ($kind:expr, |$t:ident| $body:block) => {
        match $kind {
            Kind::Float => {
                type $t = f32;
                $body
            }
            _ => {
                type $t = f64;
                $body
            }
        }
    };
}
use dispatch;

/// Runs a kernel over a range of instances, in its AVX2 + FMA build where the processor has them.
macro_rules! run {
    ($plain:ident, $wide:ident, $job:expr, $range:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if wide_simd() {
                // SAFETY: the processor supports the features `$wide` is compiled for.
                unsafe { $wide(&$job, $range) }
            } else {
                $plain(&$job, $range)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $plain(&$job, $range)
        }
    }};
}
use run;

/// Defines `$wide`, the AVX2 + FMA build of the kernel `$plain` (inlined into it).
macro_rules! wide_build {
    ($plain:ident, $wide:ident, $job:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $wide<T: Element>(job: &$job<'_, T>, range: std::ops::Range<usize>) {
            $plain(job, range)
        }
    };
}

#[cfg(target_arch = "x86_64")]
fn wide_simd() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Splits `0..n` over up to `tch::get_num_threads()` threads (scoped; the caller's thread
/// takes the first part).
fn parallel(n: usize, work: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = (tch::get_num_threads().max(1) as usize).min(n / MIN_INSTANCES_PER_THREAD).max(1);
    if threads == 1 {
        return work(0..n);
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|scope| {
        for t in 1..threads {
            let work = &work;
            scope.spawn(move || work(t * per..((t + 1) * per).min(n)));
        }
        work(0..per.min(n));
    });
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    n: usize,
    f: usize,
    d: usize,
    /// Rows per instance: heads, or pooled rows.
    k: usize,
}

/// f32 or f64.
trait Element:
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
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn from_f64(value: f64) -> Self;
    fn exp(self) -> Self;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    fn from_f64(value: f64) -> Self {
        value
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// The elements of a contiguous CPU tensor of element type `T`.
fn slice<T: Element>(t: &Tensor) -> &[T] {
    if t.numel() == 0 {
        return &[]; // an empty tensor may have no storage at all (a null data pointer)
    }
    // SAFETY: callers pass contiguous CPU tensors whose kind matches `T` (checked by `applies`
    // and `dispatch!`); the slice borrows the tensor, which keeps the storage alive.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) }
}

/// An output buffer that threads write in disjoint rows.
#[derive(Clone, Copy)]
struct Out<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: every kernel writes only the rows of its own instance range, so no element is
// written by two threads, and nothing reads the buffer until all threads have joined.
unsafe impl<T: Send> Send for Out<T> {}
unsafe impl<T: Sync> Sync for Out<T> {}

impl<T: Element> Out<T> {
    /// A freshly allocated, contiguous CPU tensor of element type `T`.
    fn new(t: &Tensor) -> Self {
        Self { ptr: t.data_ptr() as *mut T, len: t.numel() }
    }

    /// `len` elements from `start`, to be written by one thread only.
    #[allow(clippy::mut_from_ref)]
    fn row(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "kernel row out of bounds");
        // SAFETY: in bounds (checked); rows handed out to different threads are disjoint.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// `sum_i a[i] b[i]`, in four independent 8-lane partial sums, small enough for the compiler to
/// keep in vector registers.
#[inline(always)]
fn dot<T: Element>(a: &[T], b: &[T]) -> T {
    let (mut s0, mut s1, mut s2, mut s3) = ([T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8]);
    let (a_body, b_body) = (a.chunks_exact(32), b.chunks_exact(32));
    let (a_tail, b_tail) = (a_body.remainder(), b_body.remainder());
    for (a, b) in a_body.zip(b_body) {
        for l in 0..8 {
            s0[l] += a[l] * b[l];
            s1[l] += a[8 + l] * b[8 + l];
            s2[l] += a[16 + l] * b[16 + l];
            s3[l] += a[24 + l] * b[24 + l];
        }
    }
    let mut sum = T::ZERO;
    for (a, b) in a_tail.iter().zip(b_tail) {
        sum += *a * *b;
    }
    for l in 0..8 {
        sum += (s0[l] + s1[l]) + (s2[l] + s3[l]);
    }
    sum
}

/// `o += a * x`.
#[inline(always)]
fn axpy<T: Element>(o: &mut [T], a: T, x: &[T]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o += a * x;
    }
}

/// Softmax of `scores` in place; a row of nothing but -inf becomes all zeros.
#[inline(always)]
fn softmax<T: Element>(scores: &mut [T]) {
    let max = scores.iter().fold(T::NEG_INFINITY, |m, &s| if s > m { s } else { m });
    if max == T::NEG_INFINITY {
        scores.iter_mut().for_each(|s| *s = T::ZERO);
        return;
    }
    let mut total = T::ZERO;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    for s in scores.iter_mut() {
        *s = *s / total;
    }
}

/// `out = sum_f weights[f] x[f]` for the stacked features `x` (`F x D`) of one instance: `out`
/// stays in the L1 cache while the features stream past.
#[inline(always)]
fn weighted_rows<T: Element>(out: &mut [T], weights: &[T], x: &[T], d: usize) {
    out.iter_mut().for_each(|o| *o = T::ZERO);
    for (&w, xr) in weights.iter().zip(x.chunks_exact(d)) {
        axpy(out, w, xr);
    }
}

struct PoolJob<'a, T> {
    shape: Shape,
    x: &'a [T],
    w: &'a [T],
    shift: T,
    shared: bool,
    mean: bool,
    out: Out<T>,
}

#[inline(always)]
fn pool_range<T: Element>(job: &PoolJob<'_, T>, range: std::ops::Range<usize>) {
    let Shape { n, f, d, k } = job.shape;
    let uniform = vec![T::from_f64(1.0 / f as f64); f];
    let mut shifted = vec![T::ZERO; f];
    for i in range {
        let x = &job.x[i * f * d..(i + 1) * f * d];
        let w = if job.shared { job.w } else { &job.w[i * k * f..(i + 1) * k * f] };
        for row in 0..k {
            for (s, &w) in shifted.iter_mut().zip(&w[row * f..(row + 1) * f]) {
                *s = w + job.shift;
            }
            weighted_rows(job.out.row((row * n + i) * d, d), &shifted, x, d);
        }
        if job.mean {
            weighted_rows(job.out.row((k * n + i) * d, d), &uniform, x, d);
        }
    }
}
wide_build!(pool_range, pool_range_wide, PoolJob);

struct InstanceJob<'a, T> {
    shape: Shape,
    x: &'a [T],
    w: &'a [T],
    b: Option<&'a [T]>,
    fold: bool,
    mixed: Out<T>,
    importance: Out<T>,
}

#[inline(always)]
fn instance_range<T: Element>(job: &InstanceJob<'_, T>, range: std::ops::Range<usize>) {
    let Shape { f, d, .. } = job.shape;
    let fold = if job.fold { T::from_f64(1.0 / f as f64) } else { T::ZERO };
    let mut weights = vec![T::ZERO; f];
    for i in range {
        let x = &job.x[i * f * d..(i + 1) * f * d];
        for (g, score) in weights.iter_mut().enumerate() {
            let bias = job.b.map_or(T::ZERO, |b| b[g]);
            *score = dot(&job.w[g * f * d..(g + 1) * f * d], x) + bias;
        }
        softmax(&mut weights);
        job.importance.row(i * f, f).copy_from_slice(&weights);
        weights.iter_mut().for_each(|w| *w += fold);
        weighted_rows(job.mixed.row(i * d, d), &weights, x, d);
    }
}
wide_build!(instance_range, instance_range_wide, InstanceJob);

struct SelfJob<'a, T> {
    shape: Shape,
    qk: &'a [T],
    scale: T,
    m: Option<&'a [T]>,
    weights: Out<T>,
}

#[inline(always)]
fn self_range<T: Element>(job: &SelfJob<'_, T>, range: std::ops::Range<usize>) {
    let Shape { f, d, k: heads, .. } = job.shape;
    let hd = d / heads;
    let inv = T::from_f64(1.0 / f as f64);
    let mut scores = vec![T::ZERO; f];
    // One head's keys transposed, `hd x F` padded to whole blocks of 8 keys, so that a query's
    // scores against 8 keys are `sum_e q[e] keys[e, block]`: one vector register per block.
    let padded = f.div_ceil(8) * 8;
    let mut keys = vec![T::ZERO; hd * padded];
    for i in range {
        let qk = &job.qk[i * f * 2 * d..(i + 1) * f * 2 * d];
        let mask = job.m.map(|m| &m[i * f..(i + 1) * f]);
        let out = job.weights.row(i * heads * f, heads * f);
        out.iter_mut().for_each(|o| *o = T::ZERO);
        for (h, mean) in out.chunks_exact_mut(f).enumerate() {
            let head_keys = &qk[d + h * hd..];
            for (e, row) in keys.chunks_exact_mut(padded).enumerate() {
                for (key, slot) in row[..f].iter_mut().enumerate() {
                    *slot = head_keys[key * 2 * d + e];
                }
            }
            for query in 0..f {
                let q = &qk[query * 2 * d + h * hd..][..hd];
                for block in (0..f).step_by(8) {
                    let mut acc = [T::ZERO; 8];
                    for (&q, row) in q.iter().zip(keys.chunks_exact(padded)) {
                        let row = &row[block..block + 8];
                        for l in 0..8 {
                            acc[l] += q * row[l];
                        }
                    }
                    let width = (f - block).min(8);
                    for l in 0..width {
                        scores[block + l] =
                            acc[l] * job.scale + mask.map_or(T::ZERO, |m| m[block + l]);
                    }
                }
                softmax(&mut scores);
                axpy(mean, inv, &scores);
            }
        }
    }
}
wide_build!(self_range, self_range_wide, SelfJob);
