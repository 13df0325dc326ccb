//! tch-mix's own helper threads, for the kernels of threads whose OpenMP helpers sleep between
//! regions (see [`super::SLOW`]). A helper spins for [`SPIN`] after each team, so that the
//! next kernel of a caller that calls in a loop finds it awake, then sleeps. A helper that
//! comes late never holds the caller up: the caller runs whatever parts are left itself, takes
//! the offer back, and waits only for the helpers that joined.
//!
//! One team at a time has the pool; a kernel that finds it taken runs on its caller's thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::{Team, BUDGET, IN_FLIGHT};

/// How long a helper spins for the next team before it sleeps.
const SPIN: Duration = Duration::from_micros(100);

struct Pool {
    /// The helper threads started.
    helpers: AtomicUsize,
    /// Held by the caller whose team has the pool.
    busy: Mutex<()>,
    /// The address of the team on offer (a `Team` its caller keeps alive, see [`run`]), or 0.
    offer: Mutex<usize>,
    /// Teams offered so far: a helper that sees it change looks at the offer.
    offered: AtomicU64,
    /// Helpers inside the team on offer.
    inside: AtomicUsize,
    /// Helpers asleep, and where they wait.
    asleep: Mutex<usize>,
    wake: Condvar,
}

/// A lock that a panic elsewhere does not make unusable (no data it guards can be torn).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pool, started at first use with one helper fewer than `tch::get_num_threads()` (as the
/// call that starts it found it); `None` where that leaves none (or no thread could start).
fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        // The threads of the call that starts the pool before its share was taken: a
        // narrower share must not size the pool for good.
        let threads = match BUDGET.get() {
            0 => tch::get_num_threads().max(1) as usize,
            budget => budget,
        };
        let wanted = threads.saturating_sub(1);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            helpers: AtomicUsize::new(0),
            busy: Mutex::new(()),
            offer: Mutex::new(0),
            offered: AtomicU64::new(0),
            inside: AtomicUsize::new(0),
            asleep: Mutex::new(0),
            wake: Condvar::new(),
        }));
        let started = (0..wanted)
            .take_while(|_| {
                let thread = std::thread::Builder::new().name("tch-mix helper".into());
                thread.spawn(move || help(pool)).is_ok()
            })
            .count();
        pool.helpers.store(started, Ordering::Relaxed);
        (started > 0).then_some(pool)
    })
}

/// Runs `team` with the pool's helpers; false (nothing run) where the pool has no helpers or
/// another team has it.
pub(super) fn run(team: &Team<'_>) -> bool {
    let Some(pool) = pool() else { return false };
    let Ok(_busy) = pool.busy.try_lock() else { return false };
    *lock(&pool.offer) = team as *const Team<'_> as usize;
    pool.offered.fetch_add(1, Ordering::Release);
    {
        let asleep = lock(&pool.asleep);
        for _ in 0..(*asleep).min(team.parts - 1) {
            pool.wake.notify_one();
        }
    }
    team.work();
    // No helper joins once the offer is taken back; those inside finish their parts.
    *lock(&pool.offer) = 0;
    while pool.inside.load(Ordering::Acquire) != 0 {
        std::hint::spin_loop();
    }
    true
}

/// A helper's life: wait for a team (spinning, then asleep), join it, and again.
fn help(pool: &'static Pool) {
    let mut seen = pool.offered.load(Ordering::Acquire);
    loop {
        seen = wait(pool, seen);
        // A helper that would join while every core has a call of its own would only slow
        // them down: the team's caller runs the parts itself.
        if crowded(pool) {
            continue;
        }
        let team = {
            let offer = lock(&pool.offer);
            if *offer == 0 {
                continue;
            }
            pool.inside.fetch_add(1, Ordering::Relaxed);
            *offer
        };
        // SAFETY: `run` offered the address of a `Team` and keeps it alive until no helper is
        // inside it: a helper counts itself in while the offer stands (under its lock), and
        // `run` takes the offer back before it waits for `inside` to fall to 0.
        let team = unsafe { &*(team as *const Team<'_>) };
        team.work();
        pool.inside.fetch_sub(1, Ordering::Release);
    }
}

/// Whether more mixer calls are in flight than the pool has helpers: each call then has a core
/// of its own, and runs on its caller's thread.
fn crowded(pool: &Pool) -> bool {
    IN_FLIGHT.load(Ordering::Relaxed) > pool.helpers.load(Ordering::Relaxed)
}

/// Waits until a team has been offered since `seen` teams were; returns the teams offered then.
/// Waits awake (yielding the core) for [`SPIN`], unless it is [`crowded`], then asleep.
fn wait(pool: &Pool, seen: u64) -> u64 {
    let start = Instant::now();
    loop {
        let offered = pool.offered.load(Ordering::Acquire);
        if offered != seen {
            return offered;
        }
        if crowded(pool) || start.elapsed() > SPIN {
            break;
        }
        // Yield rather than spin, so that a thread woken on this core (an OpenMP helper of
        // the libtorch op that follows a kernel) runs at once.
        std::thread::yield_now();
    }
    let mut asleep = lock(&pool.asleep);
    loop {
        // Read under the lock that `run` takes to wake sleepers after it offers a team, so
        // that no offer goes unseen.
        let offered = pool.offered.load(Ordering::Acquire);
        if offered != seen {
            return offered;
        }
        *asleep += 1;
        asleep = pool.wake.wait(asleep).unwrap_or_else(|poisoned| poisoned.into_inner());
        *asleep -= 1;
    }
}
