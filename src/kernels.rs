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

/// Output buffers reused from one chunk of a large inference batch to the next, so that each
/// is allocated (and its pages first touched) once per call rather than once per chunk.
#[derive(Default)]
pub(crate) struct Scratch {
    buffers: Vec<(&'static str, Tensor)>,
}

impl Scratch {
    /// An uninitialised contiguous CPU tensor for `name`: the one handed out before under that
    /// name where its shape and kind match. A buffer must not outlive its chunk's work.
    pub(crate) fn take(&mut self, name: &'static str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let fits = |t: &Tensor| t.size() == shape && t.kind() == kind;
        if let Some((_, t)) = self.buffers.iter().find(|(n, t)| *n == name && fits(t)) {
            return Ok(t.shallow_clone());
        }
        let t = Tensor::f_empty(shape, (kind, Device::Cpu))?;
        self.buffers.retain(|(n, _)| *n != name);
        self.buffers.push((name, t.shallow_clone()));
        Ok(t)
    }
}

/// Weighted sums of stacked features: `out[k, n, :] = sum_f (w[n, k, f] + shift) x[n, f, :]`,
/// plus, with `mean`, one more row `out[K, n, :] = mean_f x[n, f, :]` (swak's skip term).
///
/// `weights`: `(N, K, F)`, or `(K, F)` shared by all instances; `x`: `(N, F, D)`. Returns
/// `(K + mean, N, D)`, head-major for per-head projections; `None` where [`applies`] is false.
pub(crate) fn pool(
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
    let k = weights.size()[weights.dim() - 2];
    let out = scratch.take("pooled", &[k + i64::from(mean), n, d], x.kind())?;
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

/// Cross-attention in one pass: `weights[n, h] = softmax_f(u[h] . x[n, f] + mask[n, f])` (all
/// zero for a fully masked row) and, with `output`, the pooled inputs `pooled[h, n] = sum_f
/// weights[n, h, f] x[n, f]` followed by their mean `pooled[H, n] = mean_f x[n, f]`.
///
/// `x`: `(N, F, D)`, `u`: the key vectors `(H, D)`, `mask`: additive `(N, F)`; returns the
/// weights `(N, H, F)` and, with `output`, the pooled inputs `(H + 1, N, D)`.
pub(crate) fn cross(
    x: &Tensor,
    u: &Tensor,
    mask: Option<&Tensor>,
    output: bool,
    scratch: &mut Scratch,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let mut tensors = vec![x, u];
    tensors.extend(mask);
    if !applies(&tensors) {
        return Ok(None);
    }
    let (n, f, d) = x.size3()?;
    let heads = u.size()[0];
    let weights = scratch.take("weights", &[n, heads, f], x.kind())?;
    let pooled = match output {
        true => Some(scratch.take("pooled", &[heads + 1, n, d], x.kind())?),
        false => None,
    };
    let (x, u) = (x.f_contiguous()?, u.f_contiguous()?);
    let mask = mask.map(Tensor::f_contiguous).transpose()?;
    let shape = Shape { n: n as usize, f: f as usize, d: d as usize, k: heads as usize };
    dispatch!(x.kind(), |T| {
        let (x, u, m) = (slice::<T>(&x), slice::<T>(&u), mask.as_ref().map(slice::<T>));
        let (weights, pooled) = (Out::<T>::new(&weights), pooled.as_ref().map(Out::<T>::new));
        let job = CrossJob { shape, x, u, m, weights, pooled };
        parallel(shape.n, |range| run!(cross_range, cross_range_wide, job, range));
    });
    Ok(Some((weights, pooled)))
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
/// . k[n, j, h] * scale + mask[n, j])`, all-zero for a fully masked row.
///
/// `qk`: the queries and keys `(N, F, 2 D)`, heads of `D / H` each; `mask`: additive `(N, F)`;
/// returns `(N, H, F)`.
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
    let weights = scratch.take("weights", &[n, heads, f], qk.kind())?;
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
                $plain::<_, false>(&$job, $range)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $plain::<_, { cfg!(target_feature = "fma") }>(&$job, $range)
        }
    }};
}
use run;

/// Defines `$wide`, the AVX2 + FMA build of the kernel `$plain` (inlined into it), with fused
/// multiply-adds.
macro_rules! wide_build {
    ($plain:ident, $wide:ident, $job:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $wide<T: Element>(job: &$job<'_, T>, range: std::ops::Range<usize>) {
            $plain::<T, true>(job, range)
        }
    };
}

#[cfg(target_arch = "x86_64")]
fn wide_simd() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Splits `0..n` over up to `tch::get_num_threads()` threads, the caller's thread taking the
/// first part. The parts run on libtorch's own OpenMP workers where its runtime is present: a
/// second set of threads would compete with them, since OpenMP workers spin for a while after
/// every libtorch op before they sleep.
fn parallel(n: usize, work: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = (tch::get_num_threads().max(1) as usize).min(n / MIN_INSTANCES_PER_THREAD).max(1);
    if threads == 1 {
        return work(0..n);
    }
    let per = n.div_ceil(threads);
    let part = |t: usize| work((t * per).min(n)..((t + 1) * per).min(n));
    if openmp::run(threads, &part) {
        return;
    }
    std::thread::scope(|scope| {
        for t in 1..threads {
            let part = &part;
            scope.spawn(move || part(t));
        }
        part(0);
    });
}

/// libtorch's OpenMP runtime (libgomp in PyTorch's Linux wheels, or a runtime that speaks its
/// ABI), looked up in the running process.
mod openmp {
    use std::ffi::{c_char, c_uint, c_void};
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};

    type Parallel =
        unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }

    /// `GOMP_parallel`, where it is loaded.
    fn runtime() -> Option<Parallel> {
        static RUNTIME: OnceLock<Option<Parallel>> = OnceLock::new();
        *RUNTIME.get_or_init(|| {
            // SAFETY: dlsym with RTLD_DEFAULT (null) only looks the symbol up; it has this
            // signature in libgomp's ABI and stays loaded with libtorch for the process's life.
            let symbol = unsafe { dlsym(std::ptr::null_mut(), c"GOMP_parallel".as_ptr()) };
            (!symbol.is_null())
                .then(|| unsafe { std::mem::transmute::<*mut c_void, Parallel>(symbol) })
        })
    }

    /// What the members of a team share: the parts to run, the next part to take, and a panic.
    struct Team<'a> {
        part: &'a (dyn Fn(usize) + Sync),
        parts: usize,
        next: AtomicUsize,
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }

    /// One OpenMP thread's share: parts taken in turn until none is left, so that a team of any
    /// size (a nested region gets one thread) runs every part once.
    unsafe extern "C" fn member(data: *mut c_void) {
        // SAFETY: `data` is the `Team` that `run` keeps alive until every member has returned.
        let team = unsafe { &*(data as *const Team<'_>) };
        loop {
            let t = team.next.fetch_add(1, Ordering::Relaxed);
            if t >= team.parts {
                return;
            }
            // A panic must not unwind into C: it is kept and resumed on the caller's thread.
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (team.part)(t))) {
                *team.panic.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(panic);
            }
        }
    }

    /// Runs `part(0)` .. `part(parts - 1)` on an OpenMP team of up to `parts` threads; false
    /// (nothing run) where the process has no OpenMP runtime.
    pub(super) fn run(parts: usize, part: &(dyn Fn(usize) + Sync)) -> bool {
        let Some(parallel) = runtime() else {
            return false;
        };
        let team = Team { part, parts, next: AtomicUsize::new(0), panic: Mutex::new(None) };
        // SAFETY: `member` only reads `team` through shared references, and GOMP_parallel
        // returns after every member of the team has finished.
        unsafe { parallel(member, &team as *const Team<'_> as *mut c_void, parts as c_uint, 0) };
        if let Some(panic) = team.panic.into_inner().unwrap_or_else(|p| p.into_inner()) {
            resume_unwind(panic);
        }
        true
    }
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
    /// `self * a + b`, rounded once.
    fn mul_add(self, a: Self, b: Self) -> Self;
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
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
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
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
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

/// Asks the processor to bring `x` into the L2 cache ahead of its use (x86-64; a no-op
/// elsewhere).
#[inline(always)]
fn prefetch<T>(x: Option<&[T]>) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = x {
        let line = 64 / std::mem::size_of::<T>();
        for start in (0..x.len()).step_by(line) {
            // SAFETY: a prefetch only hints the cache; the address lies inside `x`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    x.as_ptr().add(start) as *const i8,
                )
            };
        }
    }
}

/// `sum_i a[i] b[i]`, in four independent 8-lane partial sums, small enough for the compiler to
/// keep in vector registers.
#[inline(always)]
fn dot<T: Element, const FMA: bool>(a: &[T], b: &[T]) -> T {
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
    for l in 0..8 {
        sum += (s0[l] + s1[l]) + (s2[l] + s3[l]);
    }
    sum
}

/// `acc + a b`: one fused multiply-add where `FMA` (the builds for processors that have it),
/// else a product and a sum.
#[inline(always)]
fn madd<T: Element, const FMA: bool>(acc: T, a: T, b: T) -> T {
    if FMA {
        a.mul_add(b, acc)
    } else {
        acc + a * b
    }
}

/// `o += a * x`.
#[inline(always)]
fn axpy<T: Element, const FMA: bool>(o: &mut [T], a: T, x: &[T]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = madd::<T, FMA>(*o, a, x);
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

/// Columns of the features one register-blocked step of [`weighted_rows`] covers.
const SLAB: usize = 8;

/// `out[at(r)..][..D] = sum_f weights[r F + f] x[f]` for the stacked features `x` (`F x D`) of
/// one instance and `R` rows of weights (`R x F`): each slab of `x` is read once for four rows
/// at a time, while their partial sums stay in registers.
#[inline(always)]
fn weighted_rows<T: Element, const FMA: bool>(
    out: &Out<T>,
    at: impl Fn(usize) -> usize,
    weights: &[T],
    x: &[T],
    d: usize,
) {
    let f = x.len() / d.max(1);
    let rows = weights.len() / f.max(1);
    if rows == 1 {
        // One row streams the features in order, which the prefetcher follows best.
        let out = out.row(at(0), d);
        out.iter_mut().for_each(|o| *o = T::ZERO);
        for (&w, xr) in weights.iter().zip(x.chunks_exact(d)) {
            axpy::<T, FMA>(out, w, xr);
        }
        return;
    }
    let mut r = 0;
    while r < rows {
        let (w, row) = (&weights[r * f..], |j| out.row(at(r + j), d));
        r += match rows - r {
            1 => weighted_rows_n::<T, FMA, 1>(std::array::from_fn(row), w, x, d),
            2 => weighted_rows_n::<T, FMA, 2>(std::array::from_fn(row), w, x, d),
            3 => weighted_rows_n::<T, FMA, 3>(std::array::from_fn(row), w, x, d),
            _ => weighted_rows_n::<T, FMA, 4>(std::array::from_fn(row), w, x, d),
        };
    }
}

/// `SLAB` elements of `x` from `start`, as an array (so that loops over it need no bounds checks).
#[inline(always)]
fn slab<T>(x: &[T], start: usize) -> &[T; SLAB] {
    x[start..start + SLAB].try_into().expect("a slab of SLAB elements")
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
fn pool_range<T: Element, const FMA: bool>(job: &PoolJob<'_, T>, range: std::ops::Range<usize>) {
    let Shape { n, f, d, k } = job.shape;
    let rows = k + usize::from(job.mean);
    // The weights plus the shift, then the uniform weights of the mean.
    let mut shifted = vec![T::from_f64(1.0 / f as f64); rows * f];
    for i in range {
        let x = &job.x[i * f * d..(i + 1) * f * d];
        let w = if job.shared { job.w } else { &job.w[i * k * f..(i + 1) * k * f] };
        for (s, &w) in shifted.iter_mut().zip(w) {
            *s = w + job.shift;
        }
        weighted_rows::<T, FMA>(&job.out, |row| (row * n + i) * d, &shifted, x, d);
    }
}
wide_build!(pool_range, pool_range_wide, PoolJob);

struct CrossJob<'a, T> {
    shape: Shape,
    x: &'a [T],
    u: &'a [T],
    m: Option<&'a [T]>,
    weights: Out<T>,
    pooled: Option<Out<T>>,
}

#[inline(always)]
fn cross_range<T: Element, const FMA: bool>(job: &CrossJob<'_, T>, range: std::ops::Range<usize>) {
    let Shape { n, f, d, k: heads } = job.shape;
    // Head-major weights, then the uniform weights of the mean.
    let mut rows = vec![T::from_f64(1.0 / f as f64); (heads + 1) * f];
    for i in range {
        let x = &job.x[i * f * d..(i + 1) * f * d];
        // Four heads at a time: each feature read once for four key vectors.
        let fours = heads / 4 * 4;
        let next = job.x.get((i + 1) * f * d..(i + 2) * f * d);
        for (feature, xf) in x.chunks_exact(d).enumerate() {
            prefetch(next.map(|next| &next[feature * d..(feature + 1) * d]));
            for h in (0..fours).step_by(4) {
                let u = std::array::from_fn(|j| &job.u[(h + j) * d..(h + j + 1) * d]);
                for (j, score) in dot4::<T, FMA>(xf, u).into_iter().enumerate() {
                    rows[(h + j) * f + feature] = score;
                }
            }
            for h in fours..heads {
                rows[h * f + feature] = dot::<T, FMA>(&job.u[h * d..(h + 1) * d], xf);
            }
        }
        let weights = &mut rows[..heads * f];
        for head in weights.chunks_exact_mut(f) {
            if let Some(m) = job.m {
                head.iter_mut().zip(&m[i * f..(i + 1) * f]).for_each(|(s, &m)| *s += m);
            }
            softmax(head);
        }
        job.weights.row(i * heads * f, heads * f).copy_from_slice(weights);
        if let Some(out) = &job.pooled {
            weighted_rows::<T, FMA>(out, |row| (row * n + i) * d, &rows, x, d);
        }
    }
}
wide_build!(cross_range, cross_range_wide, CrossJob);

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
fn instance_range<T: Element, const FMA: bool>(
    job: &InstanceJob<'_, T>,
    range: std::ops::Range<usize>,
) {
    let Shape { f, d, .. } = job.shape;
    let fold = if job.fold { T::from_f64(1.0 / f as f64) } else { T::ZERO };
    let size = f * d;
    // Four instances at a time, their features in tiles that stay in the L1 cache while every
    // row of the projection (too large for L1 as a whole) passes them: each tile of the
    // projection is then read from L2 once per four instances instead of once per instance.
    let tile = INSTANCE_TILE.min(size);
    let mut scores = vec![T::ZERO; 4 * f];
    let mut start = range.start;
    while start < range.end {
        let count = (range.end - start).min(4);
        let x = &job.x[start * size..(start + count) * size];
        for scores in scores.chunks_exact_mut(f).take(count) {
            for (g, score) in scores.iter_mut().enumerate() {
                *score = job.b.map_or(T::ZERO, |b| b[g]);
            }
        }
        for t in (0..size).step_by(tile) {
            let end = (t + tile).min(size);
            for (g, w) in job.w.chunks_exact(size).enumerate() {
                let w = &w[t..end];
                if count == 4 {
                    let xs = std::array::from_fn(|j| &x[j * size + t..j * size + end]);
                    for (j, partial) in dot4::<T, FMA>(w, xs).into_iter().enumerate() {
                        scores[j * f + g] += partial;
                    }
                } else {
                    for (j, x) in x.chunks_exact(size).enumerate() {
                        scores[j * f + g] += dot::<T, FMA>(w, &x[t..end]);
                    }
                }
            }
        }
        for (j, (weights, x)) in scores.chunks_exact_mut(f).zip(x.chunks_exact(size)).enumerate() {
            let i = start + j;
            softmax(weights);
            job.importance.row(i * f, f).copy_from_slice(weights);
            weights.iter_mut().for_each(|w| *w += fold);
            weighted_rows::<T, FMA>(&job.mixed, |_| i * d, weights, x, d);
        }
        start += count;
    }
}

/// Elements of an instance's flattened features per tile of the InstanceWeightsMixer kernel.
const INSTANCE_TILE: usize = 1024;

/// `[w . x[0], .., w . x[3]]`: [`dot`] of one vector with four, `w` read once for all four,
/// in eight independent chains of sums.
#[inline(always)]
fn dot4<T: Element, const FMA: bool>(w: &[T], x: [&[T]; 4]) -> [T; 4] {
    let (mut s0, mut s1, mut s2, mut s3) = ([T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8]);
    let (mut t0, mut t1, mut t2, mut t3) = ([T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8], [T::ZERO; 8]);
    let n = w.len() / 16 * 16;
    let [x0, x1, x2, x3] = x.map(|x| &x[..n]);
    let chunks = w[..n].chunks_exact(16).zip(x0.chunks_exact(16)).zip(x1.chunks_exact(16));
    for (((w, a), b), (c, e)) in chunks.zip(x2.chunks_exact(16).zip(x3.chunks_exact(16))) {
        for l in 0..8 {
            s0[l] = madd::<T, FMA>(s0[l], w[l], a[l]);
            s1[l] = madd::<T, FMA>(s1[l], w[l], b[l]);
            s2[l] = madd::<T, FMA>(s2[l], w[l], c[l]);
            s3[l] = madd::<T, FMA>(s3[l], w[l], e[l]);
            t0[l] = madd::<T, FMA>(t0[l], w[8 + l], a[8 + l]);
            t1[l] = madd::<T, FMA>(t1[l], w[8 + l], b[8 + l]);
            t2[l] = madd::<T, FMA>(t2[l], w[8 + l], c[8 + l]);
            t3[l] = madd::<T, FMA>(t3[l], w[8 + l], e[8 + l]);
        }
    }
    let mut sums = [T::ZERO; 4];
    for (j, (s, t)) in [(s0, t0), (s1, t1), (s2, t2), (s3, t3)].into_iter().enumerate() {
        for (&w, &x) in w[n..].iter().zip(&x[j][n..]) {
            sums[j] += w * x;
        }
        for l in 0..8 {
            sums[j] += s[l] + t[l];
        }
    }
    sums
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
fn self_range<T: Element, const FMA: bool>(job: &SelfJob<'_, T>, range: std::ops::Range<usize>) {
    let Shape { f, d, k: heads, .. } = job.shape;
    let hd = d / heads;
    let inv = T::from_f64(1.0 / f as f64);
    // One head's keys of one instance transposed, `hd x F`, padded to whole slabs of features
    // (the padding stays zero): the scores of a slab of queries against a slab of keys are then
    // independent sums of `hd` products, one vector register per query.
    let padded = f.div_ceil(SLAB) * SLAB;
    let mut keys = vec![T::ZERO; hd * padded];
    let mut scores = vec![T::ZERO; padded * padded];
    for i in range {
        let qk = &job.qk[i * f * 2 * d..(i + 1) * f * 2 * d];
        let mask = job.m.map(|m| &m[i * f..(i + 1) * f]);
        let out = job.weights.row(i * heads * f, heads * f);
        out.iter_mut().for_each(|o| *o = T::ZERO);
        for (h, mean) in out.chunks_exact_mut(f).enumerate() {
            // The keys transposed into the padded buffer, from the instance's rows in L1.
            for (feature, row) in qk.chunks_exact(2 * d).enumerate() {
                for (e, &k) in row[d + h * hd..d + (h + 1) * hd].iter().enumerate() {
                    keys[e * padded + feature] = k;
                }
            }
            for qb in (0..padded).step_by(SLAB) {
                // Rows past the last query (padding) repeat it; their scores are not used.
                let q: [&[T]; SLAB] =
                    std::array::from_fn(|r| &qk[(qb + r).min(f - 1) * 2 * d + h * hd..][..hd]);
                for kb in (0..padded).step_by(SLAB) {
                    let mut acc = [[T::ZERO; SLAB]; SLAB];
                    for (e, k) in keys.chunks_exact(padded).enumerate() {
                        let k = slab(k, kb);
                        for r in 0..SLAB {
                            let q = q[r][e];
                            for l in 0..SLAB {
                                acc[r][l] = madd::<T, FMA>(acc[r][l], q, k[l]);
                            }
                        }
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        scores[(qb + r) * padded + kb..][..SLAB].copy_from_slice(acc);
                    }
                }
            }
            for row in scores.chunks_exact_mut(padded).take(f) {
                let row = &mut row[..f];
                for (key, s) in row.iter_mut().enumerate() {
                    *s = *s * job.scale + mask.map_or(T::ZERO, |m| m[key]);
                }
                softmax(row);
                axpy::<T, FMA>(mean, inv, row);
            }
        }
    }
}

wide_build!(self_range, self_range_wide, SelfJob);
