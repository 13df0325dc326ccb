//! How a kernel runs: its batch split into parts, the parts on libtorch's own OpenMP team (or
//! on scoped threads where no OpenMP runtime is loaded), each part in the widest build of the
//! kernel the processor supports.
//!
//! One of the two places with `unsafe` code (the other is [`super::memory`]): the libgomp
//! entry point, looked up with `dlsym` and called through C, and the calls of the AVX2 + FMA
//! and AVX-512VL builds of the kernels.

use std::ops::Range;
use std::sync::Mutex;

/// Multiply-adds per thread below which the work stays on the calling thread: waking a thread
/// of the team costs a few microseconds, about as long as this much arithmetic.
const MIN_WORK_PER_THREAD: usize = 1 << 17;

/// A kernel: work over a range of instances that writes only its own part of the outputs.
pub(crate) trait Kernel: Sync {
    /// The outputs of one range of instances, disjoint from every other range's.
    type Part: Send;

    /// Runs the kernel over `range`, writing `part`; with fused multiply-adds where `FMA`, and
    /// with 32 vector registers where `REGS32` (AVX-512VL: the builds where kernels may keep
    /// twice as many sums in registers). Implementations are `#[inline(always)]`, so that each
    /// build compiles them anew.
    fn run<const FMA: bool, const REGS32: bool>(&self, range: Range<usize>, part: Self::Part);
}

/// The number of instances in each part of a batch of `n` instances of `work` multiply-adds
/// each: the batch splits over up to `tch::get_num_threads()` threads, each with at least
/// [`MIN_WORK_PER_THREAD`].
pub(crate) fn part_size(n: usize, work: usize) -> usize {
    let most = n.saturating_mul(work.max(1)) / MIN_WORK_PER_THREAD;
    let threads = (tch::get_num_threads().max(1) as usize).min(most).max(1);
    n.div_ceil(threads).max(1)
}

/// The ranges of instances of a batch of `n` in parts of `per` (see [`part_size`]).
pub(crate) fn ranges(n: usize, per: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(per.max(1)).map(move |start| start..(start + per).min(n))
}

/// Runs `kernel` over every `(range, part)`, the caller's thread taking a share. The parts run
/// on libtorch's OpenMP workers where its runtime is present: a second set of threads would
/// compete with them, since OpenMP workers spin for a while after every libtorch op.
pub(crate) fn run<K: Kernel>(kernel: &K, parts: Vec<(Range<usize>, K::Part)>) {
    if parts.len() <= 1 {
        parts.into_iter().for_each(|(range, part)| run_one(kernel, range, part));
        return;
    }
    let count = parts.len();
    // Each part is taken exactly once, by whichever thread gets to its index first.
    let parts: Vec<Mutex<Option<_>>> =
        parts.into_iter().map(|part| Mutex::new(Some(part))).collect();
    let take = |t: usize| {
        let part = parts[t].lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some((range, part)) = part {
            run_one(kernel, range, part);
        }
    };
    if openmp::run(count, &take) {
        return;
    }
    std::thread::scope(|scope| {
        for t in 1..count {
            let take = &take;
            scope.spawn(move || take(t));
        }
        take(0);
    });
}

/// Runs one part in the widest build of the kernel the processor supports: AVX-512VL (32
/// vector registers), AVX2 + FMA, or the baseline.
fn run_one<K: Kernel>(kernel: &K, range: Range<usize>, part: K::Part) {
    #[cfg(target_arch = "x86_64")]
    {
        match simd() {
            // SAFETY: the processor supports the features `run_avx512` is compiled for.
            Simd::Avx512 => unsafe { run_avx512(kernel, range, part) },
            // SAFETY: the processor supports the features `run_avx2` is compiled for.
            Simd::Avx2 => unsafe { run_avx2(kernel, range, part) },
            Simd::Baseline => kernel.run::<false, false>(range, part),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    kernel.run::<{ cfg!(target_feature = "fma") }, false>(range, part)
}

/// The AVX2 + FMA build of a kernel (its `run` is inlined here), with fused multiply-adds.
///
/// # Safety
/// The processor must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(kernel: &K, range: Range<usize>, part: K::Part) {
    kernel.run::<true, false>(range, part)
}

/// The AVX-512VL build of a kernel: AVX2 and FMA with 32 vector registers.
///
/// # Safety
/// The processor must support AVX2, FMA, AVX-512F and AVX-512VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn run_avx512<K: Kernel>(kernel: &K, range: Range<usize>, part: K::Part) {
    kernel.run::<true, true>(range, part)
}

/// The instruction sets a build of the kernels can use.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Avx512,
    Avx2,
    Baseline,
}

/// What this processor supports, detected once. `TCH_MIX_SIMD=avx2` or `baseline` caps it (to
/// compare the builds, or to rule one out).
#[cfg(target_arch = "x86_64")]
fn simd() -> Simd {
    use std::sync::OnceLock;
    static SIMD: OnceLock<Simd> = OnceLock::new();
    *SIMD.get_or_init(|| {
        let cap = std::env::var("TCH_MIX_SIMD").unwrap_or_default();
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && cap != "baseline";
        let avx512 = avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && cap != "avx2";
        match (avx512, avx2) {
            (true, _) => Simd::Avx512,
            (false, true) => Simd::Avx2,
            _ => Simd::Baseline,
        }
    })
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
            // SAFETY: dlsym with RTLD_DEFAULT (null) only looks the symbol up.
            let symbol = unsafe { dlsym(std::ptr::null_mut(), c"GOMP_parallel".as_ptr()) };
            (!symbol.is_null()).then(|| {
                // SAFETY: `GOMP_parallel` has this signature in libgomp's ABI, and it stays
                // loaded with libtorch for the life of the process.
                unsafe { std::mem::transmute::<*mut c_void, Parallel>(symbol) }
            })
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
    ///
    /// # Safety
    /// `data` must point to a `Team` that outlives the call.
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
        // returns after every member of the team has finished, so `team` outlives them all.
        unsafe { parallel(member, &team as *const Team<'_> as *mut c_void, parts as c_uint, 0) };
        if let Some(panic) = team.panic.into_inner().unwrap_or_else(|p| p.into_inner()) {
            resume_unwind(panic);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Adds each index of its range to its part, and counts the instances it saw.
    struct Count<'a>(&'a AtomicUsize);

    impl<'a> Kernel for Count<'a> {
        type Part = &'a mut [usize];

        fn run<const FMA: bool, const REGS32: bool>(&self, range: Range<usize>, part: Self::Part) {
            assert!(range.start != 999, "a part that fails");
            for (slot, i) in part.iter_mut().zip(range.clone()) {
                *slot += i;
            }
            self.0.fetch_add(range.len(), Ordering::Relaxed);
        }
    }

    #[test]
    fn every_instance_runs_once_in_its_own_part() {
        for n in [0, 1, 31, 64, 1000, 4097] {
            let seen = AtomicUsize::new(0);
            let mut out = vec![0; n];
            let per = part_size(n, MIN_WORK_PER_THREAD).min(100);
            let parts = ranges(n, per).zip(out.chunks_mut(per)).collect();
            run(&Count(&seen), parts);
            assert_eq!(seen.load(Ordering::Relaxed), n);
            assert!(out.iter().enumerate().all(|(i, &v)| v == i), "{n} instances");
        }
    }

    #[test]
    fn a_panic_in_a_part_reaches_the_caller() {
        let seen = AtomicUsize::new(0);
        let mut out = vec![0; 2000];
        let parts: Vec<_> = ranges(2000, 999).zip(out.chunks_mut(999)).collect();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&Count(&seen), parts);
        }));
        assert!(result.is_err());
    }
}
