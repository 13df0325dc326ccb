//! How a kernel runs: its batch split into parts, the parts on libtorch's own OpenMP team (or
//! on scoped threads where no OpenMP runtime is loaded), or on tch-mix's own [`pool`] of
//! helpers where the OpenMP team's helpers sleep between regions, each part in the widest
//! build of the kernel the processor supports; and how concurrent mixer calls share the cores
//! ([`Call`]).
//!
//! One of the two places with `unsafe` code (the other is [`super::memory`]): the entry points
//! of libgomp and MKL, looked up with `dlsym` and called through C, the calls of the
//! AVX2 + FMA and AVX-512VL builds of the kernels, and the pool's view of the team it offers.

use std::any::Any;
use std::cell::Cell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

/// Multiply-adds per thread below which the work stays on the calling thread: starting and
/// ending a team whose helpers spin between regions takes a few microseconds, about as long as
/// this much arithmetic.
const MIN_WORK_PER_THREAD: usize = 1 << 17;

/// How long (nanoseconds) a thread's OpenMP helpers may take to join its teams for the kernels
/// to run on them; slower, and they run on tch-mix's own [`pool`], whose helpers spin for a
/// while after each kernel.
const ASLEEP_NS: u64 = 5_000;

/// OpenMP teams in a row whose helpers joined late, after which a thread's kernels run on the
/// [`pool`].
const SLOW_TEAMS: u32 = 8;

/// One in this many teams of a thread whose OpenMP helpers were found asleep runs on them all
/// the same, to measure them again.
const PROBE_EVERY: u32 = 256;

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

    /// How many of this thread's latest OpenMP teams in a row had a helper that took longer
    /// than [`ASLEEP_NS`] to join (at most [`SLOW_TEAMS`]). libgomp's helpers wait for the
    /// next region spinning (they join in about a microsecond) only while it runs no more
    /// threads than the machine has cores; past that (a service whose request threads each
    /// start teams) they sleep, and waking one takes tens of microseconds, longer than a small
    /// batch's work. A helper held up once by the scheduler, or started for the first team,
    /// breaks no streak.
    static SLOW: Cell<u32> = const { Cell::new(0) };

    /// Teams run on the [`pool`] since the last one that ran on OpenMP to measure it.
    static SINCE_PROBE: Cell<u32> = const { Cell::new(0) };
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
/// [`MIN_WORK_PER_THREAD`].
pub(crate) fn part_size(n: usize, work: usize) -> usize {
    let most = n.saturating_mul(work.max(1)) / MIN_WORK_PER_THREAD;
    let threads = threads().min(most).max(1);
    n.div_ceil(threads).max(1)
}

/// Where this thread's next team runs: on libtorch's OpenMP helpers unless [`SLOW_TEAMS`] in a
/// row found them asleep (and then one team in [`PROBE_EVERY`], to measure them again), else on
/// the [`pool`].
fn on_openmp() -> bool {
    if SLOW.get() < SLOW_TEAMS {
        return true;
    }
    let since = SINCE_PROBE.get() + 1;
    SINCE_PROBE.set(since % PROBE_EVERY);
    since == PROBE_EVERY
}

/// Takes into this thread's [`SLOW`] streak that the helpers of its latest OpenMP team took
/// `wake` to join.
fn measured(wake: Duration) {
    SLOW.set(match wake.as_nanos() > u128::from(ASLEEP_NS) {
        true => (SLOW.get() + 1).min(SLOW_TEAMS),
        false => 0,
    });
}

/// The ranges of instances of a batch of `n` in parts of `per` (see [`part_size`]).
pub(crate) fn ranges(n: usize, per: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(per.max(1)).map(move |start| start..(start + per).min(n))
}

/// Runs `kernel` over every `(range, part)`, the caller's thread taking a share. The parts run
/// on libtorch's OpenMP helpers where its runtime is present and they join promptly: a second
/// set of threads would compete with them, since they spin for a while after every libtorch op.
/// Where they sleep between regions, the parts run on tch-mix's own [`pool`] (on the caller's
/// thread alone while another call's kernel has it).
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
    let team = Team::new(&take, count);
    if !on_openmp() {
        if !pool::run(&team) {
            team.work();
        }
    } else if openmp::run(&team) {
        measured(team.joined());
    } else {
        std::thread::scope(|scope| {
            for _ in 1..count {
                scope.spawn(|| team.work());
            }
            team.work();
        });
        measured(team.joined());
    }
    team.finish();
}

/// What the threads of a team share: the parts to run, the next part to take, a panic, and
/// when the team started and its last member joined it (nanoseconds after the start).
struct Team<'a> {
    part: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    start: Instant,
    latest: AtomicU64,
}

impl<'a> Team<'a> {
    /// A team for `part(0)` .. `part(parts - 1)`, starting now.
    fn new(part: &'a (dyn Fn(usize) + Sync), parts: usize) -> Self {
        Self {
            part,
            parts,
            next: AtomicUsize::new(0),
            panic: Mutex::new(None),
            start: Instant::now(),
            latest: AtomicU64::new(0),
        }
    }

    /// One member's share: parts taken in turn until none is left, so that a team of any size
    /// runs every part once. A panic is kept for [`Team::finish`], never unwound into the
    /// thread that runs the member (OpenMP's C code, or a helper of the pool).
    fn work(&self) {
        self.latest.fetch_max(nanos_since(self.start), Ordering::Relaxed);
        loop {
            let t = self.next.fetch_add(1, Ordering::Relaxed);
            if t >= self.parts {
                return;
            }
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (self.part)(t))) {
                *self.panic.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(panic);
            }
        }
    }

    /// How long the team's last member took to join it.
    fn joined(&self) -> Duration {
        Duration::from_nanos(self.latest.load(Ordering::Relaxed))
    }

    /// Ends the team on the caller's thread, resuming a part's panic there.
    fn finish(self) {
        if let Some(panic) = self.panic.into_inner().unwrap_or_else(|p| p.into_inner()) {
            resume_unwind(panic);
        }
    }
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

mod pool;

/// libtorch's OpenMP runtime (libgomp in PyTorch's Linux wheels, or a runtime that speaks its
/// ABI) and the thread setting of its MKL, looked up in the running process.
mod openmp {
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
    use std::sync::OnceLock;

    use super::Team;

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

    /// One OpenMP thread's share of the team.
    ///
    /// # Safety
    /// `data` must point to a `Team` that outlives the call.
    unsafe extern "C" fn member(data: *mut c_void) {
        // SAFETY: `data` is the `Team` that `run` keeps alive until every member has returned.
        let team = unsafe { &*(data as *const Team<'_>) };
        team.work();
    }

    /// Runs `team` on an OpenMP team of up to `team.parts` threads (every member, the late
    /// ones too, joins it before it ends); false (nothing run) where the process has no
    /// OpenMP runtime.
    pub(super) fn run(team: &Team<'_>) -> bool {
        let Some(parallel) = runtime() else {
            return false;
        };
        let threads = c_uint::try_from(team.parts).unwrap_or(c_uint::MAX);
        // SAFETY: `member` only reads `team` through shared references, and GOMP_parallel
        // returns after every member of the team has finished, so `team` outlives them all.
        unsafe { parallel(member, team as *const Team<'_> as *mut c_void, threads, 0) };
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
    fn a_streak_of_late_helpers_moves_the_kernels_and_one_prompt_team_ends_it() {
        SLOW.set(0);
        measured(Duration::from_micros(180));
        assert!(on_openmp(), "one late team (the first one starts the helpers) is no streak");
        for _ in 1..SLOW_TEAMS {
            measured(Duration::from_micros(40));
        }
        assert_eq!(SLOW.get(), SLOW_TEAMS);
        measured(Duration::MAX);
        assert_eq!(SLOW.get(), SLOW_TEAMS, "the streak is capped");
        measured(Duration::from_nanos(900));
        assert_eq!(SLOW.get(), 0, "a prompt team ends it");
    }

    #[test]
    fn a_thread_whose_openmp_helpers_sleep_probes_them_once_in_a_while() {
        SLOW.set(SLOW_TEAMS - 1);
        assert!((0..1000).all(|_| on_openmp()), "short of a streak, the teams stay");
        SLOW.set(SLOW_TEAMS);
        SINCE_PROBE.set(0);
        let probes = (0..2 * PROBE_EVERY).filter(|_| on_openmp()).count();
        assert_eq!(probes, 2, "one team in {PROBE_EVERY} measures them again");
        // A real team on OpenMP measures how long its helpers took.
        SLOW.set(0);
        let seen = AtomicUsize::new(0);
        let mut out = [0; 2];
        run(&Count(&seen), ranges(2, 1).zip(out.chunks_mut(1)).collect());
        assert_eq!(seen.load(Ordering::Relaxed), 2);
        assert!(SLOW.get() <= 1, "one team, measured");
    }

    /// Runs `parts` parts as one team on the pool (as a thread whose OpenMP helpers sleep);
    /// each part runs `part` with its index.
    fn on_the_pool(parts: usize, part: impl Fn(usize) + Sync) {
        SLOW.set(SLOW_TEAMS);
        SINCE_PROBE.set(0);
        let kernel = Each(&part);
        let mut out = vec![0; parts];
        run(&kernel, ranges(parts, 1).zip(out.chunks_mut(1)).collect());
        SLOW.set(0);
    }

    /// Runs a closure on the first index of each range.
    struct Each<'a>(&'a (dyn Fn(usize) + Sync));

    impl<'a> Kernel for Each<'a> {
        type Part = &'a mut [usize];

        fn run<const FMA: bool, const REGS32: bool>(&self, range: Range<usize>, _: Self::Part) {
            (self.0)(range.start)
        }
    }

    #[test]
    fn the_pool_runs_the_parts_of_a_team_at_once_on_its_helpers() {
        if tch::get_num_threads() < 2 {
            eprintln!("skipped: libtorch runs one thread here, so the pool has no helpers");
            return;
        }
        // Each part waits a while for the other to start: both start where two threads run
        // them at once. A helper stays out while other tests' calls fill the cores, so the
        // team is offered again until one joins.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let joined = std::iter::repeat_with(|| {
            let (started, helpers) = (AtomicUsize::new(0), AtomicUsize::new(0));
            on_the_pool(2, |_| {
                started.fetch_add(1, Ordering::SeqCst);
                let patience = std::time::Instant::now() + Duration::from_millis(50);
                while started.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < patience {
                    std::hint::spin_loop();
                }
                if std::thread::current().name() == Some("tch-mix helper") {
                    helpers.fetch_add(1, Ordering::SeqCst);
                }
            });
            assert_eq!(started.into_inner(), 2, "every part runs");
            helpers.into_inner()
        })
        .take_while(|_| std::time::Instant::now() < deadline)
        .any(|helpers| helpers == 1);
        assert!(joined, "no helper of the pool ran a part in 30 s");
    }

    #[test]
    fn teams_of_threads_that_share_the_pool_run_every_part_once() {
        // Two threads offer teams at once: one has the pool, the other runs on its own thread.
        let runs = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        let seen: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
                        on_the_pool(4, |t| {
                            seen[t].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
                        runs.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(runs.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn a_panic_in_a_part_on_the_pool_reaches_the_caller_and_the_pool_goes_on() {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            on_the_pool(2, |t| assert!(t != 1, "a part that fails"));
        }));
        assert!(result.is_err());
        let seen = AtomicUsize::new(0);
        on_the_pool(2, |_| {
            seen.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(seen.load(Ordering::Relaxed), 2);
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
