//! How a kernel runs: its batch split into parts, the parts on libtorch's own OpenMP team (or
//! on scoped threads where no OpenMP runtime is loaded), each part in the widest build of the
//! kernel the processor supports; and how concurrent mixer calls share the cores ([`Call`]).
//!
//! One of the two places with `unsafe` code (the other is [`super::memory`]): the entry points
//! of libgomp and MKL, looked up with `dlsym` and called through C, and the calls of the
//! AVX2 + FMA and AVX-512VL builds of the kernels.

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

/// Multiply-adds per thread below which the work stays on the calling thread: starting and
/// ending a team whose helpers spin between regions takes a few microseconds, about as long as
/// this much arithmetic.
const MIN_WORK_PER_THREAD: usize = 1 << 17;

/// Multiply-adds per thread per nanosecond that a thread of the team took to join it, below
/// which the work stays on the calling thread. A part runs about 32 multiply-adds a
/// nanosecond; a team pays for a late helper where each thread's part takes at least twice as
/// long as the helper took to arrive (once to start it, once to wait for it at the end).
const WORK_PER_WAKE_NS: usize = 64;

/// One in this many splits that the wake cost rules out runs all the same, to measure it again.
const PROBE_EVERY: u32 = 64;

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

/// Mixer calls on the CPU in this process, on every thread, that have not yet returned.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The threads this thread's mixer call started with (`tch::get_num_threads()` then), to
    /// be shared out among the calls in flight ([`Call`]); 0 outside a call.
    static BUDGET: Cell<usize> = const { Cell::new(0) };

    /// How long the helpers of this thread's teams took to join them, in nanoseconds: the
    /// latest team's time where it was shorter, else a running mean that rises slowly (a
    /// helper held up once by the scheduler should not rule out teams for long). libgomp's helpers wait for the next region spinning
    /// (they join in well under a microsecond) only while it runs no more threads than the
    /// machine has cores; past that (a service whose request threads each start teams) they
    /// sleep, and waking one takes tens of microseconds, longer than a small batch's work.
    static WAKE_NS: Cell<u64> = const { Cell::new(0) };

    /// The splits ruled out by the wake cost since the last one that ran to measure it.
    static FORGONE: Cell<u32> = const { Cell::new(0) };
}

/// A call's share of `budget` threads while `in_flight` calls run: an equal part, at least one.
fn share(budget: usize, in_flight: usize) -> usize {
    (budget / in_flight.max(1)).max(1)
}

/// One mixer call on the CPU, from its start to its return: it counts among the calls in
/// flight, and the threads it runs on are its share of `tch::get_num_threads()`, divided evenly
/// among the calls in flight. libtorch's ops (their OpenMP and MKL teams) get the share of the
/// moment the call starts; the kernels take the share of the moment each of them starts, so a
/// long call takes the cores back that shorter calls beside it have left. A lone call has every
/// thread; as many concurrent calls as threads run each on its caller's thread alone, rather
/// than each starting a team of its own that would compete with the others for the same cores.
/// A call within a call counts once.
pub(crate) struct Call {
    /// Whether this is the outermost call on its thread (the one that counts).
    counted: bool,
    /// The thread's settings before the call, where it narrowed them.
    restore: Option<openmp::Threads>,
}

impl Call {
    /// Starts a call on input `inp`; only calls on the CPU count.
    pub(crate) fn start(inp: &Tensor) -> Self {
        let cpu = inp.defined() && inp.device() == Device::Cpu;
        if !cpu || BUDGET.get() != 0 {
            return Self { counted: false, restore: None };
        }
        let in_flight = IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1;
        // Read first: libtorch settles a thread's OpenMP setting at its first read, which
        // would otherwise overwrite the narrower one set below.
        let budget = tch::get_num_threads().max(1) as usize;
        BUDGET.set(budget);
        let share = share(budget, in_flight);
        let restore = match share < budget {
            true => openmp::narrow(share),
            false => None,
        };
        Self { counted: true, restore }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.counted {
            if let Some(threads) = self.restore.take() {
                openmp::restore(threads);
            }
            BUDGET.set(0);
            IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The threads a kernel may split its batch over: `tch::get_num_threads()` outside a mixer
/// call, and within one the call's share of its threads now ([`Call`]).
fn threads() -> usize {
    match BUDGET.get() {
        0 => tch::get_num_threads().max(1) as usize,
        budget => share(budget, IN_FLIGHT.load(Ordering::Relaxed)),
    }
}

/// The number of instances in each part of a batch of `n` instances of `work` multiply-adds
/// each: the batch splits over up to [`threads`] threads, each with at least
/// [`MIN_WORK_PER_THREAD`], and with enough to pay for the time this thread's helpers take to
/// join a team ([`WAKE_NS`]; one in [`PROBE_EVERY`] of the splits that rules out runs all the
/// same, so that the cost is measured again as it changes).
pub(crate) fn part_size(n: usize, work: usize) -> usize {
    let (threads, total) = (threads(), n.saturating_mul(work.max(1)));
    let cheap = team_size(threads, total, 0);
    let mut chosen = team_size(threads, total, WAKE_NS.get());
    if chosen < cheap {
        let forgone = FORGONE.get() + 1;
        FORGONE.set(forgone % PROBE_EVERY);
        if forgone == PROBE_EVERY {
            chosen = cheap;
        }
    }
    n.div_ceil(chosen).max(1)
}

/// The threads, at most `threads`, that `total` multiply-adds split over: each with at least
/// [`MIN_WORK_PER_THREAD`], and with enough to pay for helpers that take `wake_ns` to join.
fn team_size(threads: usize, total: usize, wake_ns: u64) -> usize {
    let wake = usize::try_from(wake_ns).unwrap_or(usize::MAX);
    let least = wake.saturating_mul(WORK_PER_WAKE_NS).max(MIN_WORK_PER_THREAD);
    threads.min(total / least).max(1)
}

/// Takes into this thread's [`WAKE_NS`] that the helpers of its latest team took `wake` to join.
fn measured(wake: Duration) {
    let sample = u64::try_from(wake.as_nanos()).unwrap_or(u64::MAX);
    let mean = WAKE_NS.get();
    WAKE_NS.set(match sample < mean {
        true => sample,
        false => mean / 4 * 3 + sample / 4,
    });
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
    if let Some(wake) = openmp::run(count, &take) {
        measured(wake);
        return;
    }
    let start = Instant::now();
    let latest = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 1..count {
            let (take, latest) = (&take, &latest);
            scope.spawn(move || {
                latest.fetch_max(nanos_since(start), Ordering::Relaxed);
                take(t)
            });
        }
        take(0);
    });
    measured(Duration::from_nanos(latest.into_inner()));
}

/// The nanoseconds since `start`, saturated.
fn nanos_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
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
/// ABI) and the thread setting of its MKL, looked up in the running process.
mod openmp {
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
    use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    type Parallel =
        unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
    /// `omp_set_num_threads` and `omp_get_max_threads`.
    type SetThreads = unsafe extern "C" fn(c_int);
    type GetThreads = unsafe extern "C" fn() -> c_int;
    /// MKL's `mkl_set_num_threads_local`, whose C entry point is `MKL_Set_Num_Threads_Local`
    /// (the lower-case symbol is the Fortran one, which takes a pointer): returns the thread's
    /// setting before (0: MKL's global one).
    type SetLocalThreads = unsafe extern "C" fn(c_int) -> c_int;

    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }

    /// The address of `symbol` in the running process, if it is loaded.
    fn lookup(symbol: &CStr) -> Option<*mut c_void> {
        // SAFETY: dlsym with RTLD_DEFAULT (null) only looks the symbol up.
        let address = unsafe { dlsym(std::ptr::null_mut(), symbol.as_ptr()) };
        (!address.is_null()).then_some(address)
    }

    /// `GOMP_parallel`, where it is loaded.
    fn runtime() -> Option<Parallel> {
        static RUNTIME: OnceLock<Option<Parallel>> = OnceLock::new();
        *RUNTIME.get_or_init(|| {
            // SAFETY: `GOMP_parallel` has this signature in libgomp's ABI, and it stays
            // loaded with libtorch for the life of the process.
            lookup(c"GOMP_parallel")
                .map(|f| unsafe { std::mem::transmute::<*mut c_void, Parallel>(f) })
        })
    }

    /// The per-thread settings of the number of threads: OpenMP's (libtorch's ops read it)
    /// and, where libtorch carries MKL, MKL's.
    struct Settings {
        set: SetThreads,
        get: GetThreads,
        mkl: Option<SetLocalThreads>,
    }

    fn settings() -> Option<&'static Settings> {
        static SETTINGS: OnceLock<Option<Settings>> = OnceLock::new();
        SETTINGS
            .get_or_init(|| {
                let (set, get) = (lookup(c"omp_set_num_threads")?, lookup(c"omp_get_max_threads")?);
                let mkl = lookup(c"MKL_Set_Num_Threads_Local");
                // SAFETY: these functions have these signatures in the OpenMP and MKL ABIs,
                // and they stay loaded with libtorch for the life of the process.
                unsafe {
                    Some(Settings {
                        set: std::mem::transmute::<*mut c_void, SetThreads>(set),
                        get: std::mem::transmute::<*mut c_void, GetThreads>(get),
                        mkl: mkl.map(|f| std::mem::transmute::<*mut c_void, SetLocalThreads>(f)),
                    })
                }
            })
            .as_ref()
    }

    /// A thread's settings before [`narrow`].
    pub(super) struct Threads {
        openmp: c_int,
        mkl: Option<c_int>,
    }

    /// Sets the calling thread's OpenMP and MKL teams to at most `threads` threads, returning
    /// what they were; `None` (nothing set) where the process has no OpenMP runtime.
    pub(super) fn narrow(threads: usize) -> Option<Threads> {
        let settings = settings()?;
        let threads = c_int::try_from(threads).unwrap_or(c_int::MAX).max(1);
        // SAFETY: both calls only read or write the calling thread's settings.
        unsafe {
            let openmp = (settings.get)();
            (settings.set)(threads);
            let mkl = settings.mkl.map(|set| set(threads));
            Some(Threads { openmp, mkl })
        }
    }

    /// Sets the calling thread's settings back to what [`narrow`] found.
    pub(super) fn restore(threads: Threads) {
        let Some(settings) = settings() else { return };
        // SAFETY: as in `narrow`.
        unsafe {
            (settings.set)(threads.openmp.max(1));
            if let (Some(set), Some(mkl)) = (settings.mkl, threads.mkl) {
                set(mkl);
            }
        }
    }

    /// What the members of a team share: the parts to run, the next part to take, a panic,
    /// and when the team started and its last member joined it (nanoseconds after the start).
    struct Team<'a> {
        part: &'a (dyn Fn(usize) + Sync),
        parts: usize,
        next: AtomicUsize,
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
        start: Instant,
        latest: AtomicU64,
    }

    /// One OpenMP thread's share: parts taken in turn until none is left, so that a team of any
    /// size (a nested region gets one thread) runs every part once.
    ///
    /// # Safety
    /// `data` must point to a `Team` that outlives the call.
    unsafe extern "C" fn member(data: *mut c_void) {
        // SAFETY: `data` is the `Team` that `run` keeps alive until every member has returned.
        let team = unsafe { &*(data as *const Team<'_>) };
        team.latest.fetch_max(super::nanos_since(team.start), Ordering::Relaxed);
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

    /// Runs `part(0)` .. `part(parts - 1)` on an OpenMP team of up to `parts` threads and
    /// returns how long its last member took to join it (every member, the late ones too, must
    /// have joined before the team ends); `None` (nothing run) where the process has no OpenMP
    /// runtime.
    pub(super) fn run(parts: usize, part: &(dyn Fn(usize) + Sync)) -> Option<Duration> {
        let parallel = runtime()?;
        let team = Team {
            part,
            parts,
            next: AtomicUsize::new(0),
            panic: Mutex::new(None),
            start: Instant::now(),
            latest: AtomicU64::new(0),
        };
        // SAFETY: `member` only reads `team` through shared references, and GOMP_parallel
        // returns after every member of the team has finished, so `team` outlives them all.
        unsafe { parallel(member, &team as *const Team<'_> as *mut c_void, parts as c_uint, 0) };
        if let Some(panic) = team.panic.into_inner().unwrap_or_else(|p| p.into_inner()) {
            resume_unwind(panic);
        }
        Some(Duration::from_nanos(team.latest.into_inner()))
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
    fn a_call_started_while_another_runs_gets_at_most_half_the_threads() {
        let cpu = || Tensor::zeros([1], (tch::Kind::Float, Device::Cpu));
        let all = tch::get_num_threads().max(1) as usize;
        let first_started = std::sync::Barrier::new(2);
        let second_done = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _first = Call::start(&cpu());
                first_started.wait();
                second_done.wait();
            });
            first_started.wait();
            let before = tch::get_num_threads();
            {
                // Other tests' calls may be in flight too: they only make the share smaller.
                let _second = Call::start(&cpu());
                let share = (all / 2).max(1);
                assert!(threads() >= 1 && threads() <= share, "{} of {all}", threads());
                assert!(tch::get_num_threads() as usize <= share, "libtorch's ops follow it");
                assert!(part_size(1 << 20, MIN_WORK_PER_THREAD) >= (1 << 20) / share);
                let _inner = Call::start(&cpu());
                assert!(threads() <= share, "a call within a call keeps the share");
            }
            assert_eq!(BUDGET.get(), 0);
            assert_eq!(tch::get_num_threads(), before, "the thread's setting is restored");
            second_done.wait();
        });
    }

    #[test]
    fn helpers_that_join_late_keep_small_batches_on_the_calling_thread() {
        let total = 16 * MIN_WORK_PER_THREAD;
        assert_eq!(team_size(4, total, 0), 4, "helpers that join at once");
        assert_eq!(team_size(4, total, 900), 4, "a spinning team (under a microsecond)");
        // 40 us to join (sleeping helpers): each thread needs 64 x 40,000 multiply-adds.
        assert_eq!(team_size(4, total, 40_000), 1);
        assert_eq!(team_size(4, 4 * 64 * 40_000, 40_000), 4);
        assert_eq!(team_size(4, 3 * 64 * 40_000, 40_000), 3);
        assert_eq!(team_size(4, usize::MAX, u64::MAX), 1, "no overflow");
        assert_eq!(team_size(0, total, 0), 1, "never less than the caller's own thread");
    }

    #[test]
    fn the_cost_of_joining_falls_at_once_and_rises_slowly() {
        WAKE_NS.set(1_000);
        measured(Duration::from_nanos(41_000));
        assert_eq!(WAKE_NS.get(), 750 + 10_250, "a late helper moves the mean a quarter");
        measured(Duration::from_nanos(900));
        assert_eq!(WAKE_NS.get(), 900, "a prompt team is believed at once");
        measured(Duration::MAX);
        assert!(WAKE_NS.get() >= u64::MAX / 4, "saturated, not wrapped");
        WAKE_NS.set(0);
    }

    #[test]
    fn a_split_ruled_out_by_the_cost_of_joining_runs_once_in_a_while_to_measure_it() {
        if threads() < 2 {
            eprintln!("skipped: libtorch runs one thread here, so no batch splits");
            return;
        }
        let (n, work) = (64, 4 * MIN_WORK_PER_THREAD);
        WAKE_NS.set(u64::MAX / 2);
        FORGONE.set(0);
        let parts: Vec<usize> = (0..2 * PROBE_EVERY).map(|_| part_size(n, work)).collect();
        let probes = parts.iter().filter(|&&per| per < n).count();
        assert_eq!(probes, 2, "one probe in {PROBE_EVERY}: {parts:?}");
        WAKE_NS.set(0);
        assert!(part_size(n, work) < n, "prompt helpers split the batch");
        // A real team measures how long its helpers took.
        let seen = AtomicUsize::new(0);
        let mut out = [0; 2];
        run(&Count(&seen), ranges(2, 1).zip(out.chunks_mut(1)).collect());
        assert!(WAKE_NS.get() > 0, "the team's joining time is taken in");
        WAKE_NS.set(0);
    }

    #[test]
    fn calls_in_flight_share_the_threads_equally() {
        assert_eq!(share(8, 1), 8);
        assert_eq!(share(8, 3), 2);
        assert_eq!(share(2, 16), 1, "never less than the caller's own thread");
        assert_eq!(share(4, 0), 4);
    }

    #[test]
    fn calls_off_the_cpu_do_not_count() {
        let undefined = Tensor::new();
        let _call = Call::start(&undefined);
        assert_eq!(BUDGET.get(), 0);
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
