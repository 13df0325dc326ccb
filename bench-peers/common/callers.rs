//! Concurrent callers, as `examples/concurrency.rs` (tch-mix) and bench-peers/ort (ONNX Runtime)
//! time them: N threads calling at once, their throughput and latency percentiles. Included by
//! `#[path]`, as median.rs.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// Calls each caller makes before any is timed.
const WARM_UP_CALLS: usize = 20;

/// One run: `callers` threads, each with the call `setup(t)` makes on its own thread, warmed up,
/// then all calling at once until `seconds` have passed. Returns the calls per second of all
/// threads together and every call's latency.
pub fn run<C: FnMut() -> Result<()>>(
    callers: usize,
    seconds: f64,
    setup: impl Fn(usize) -> Result<C> + Sync,
) -> Result<(f64, Vec<Duration>)> {
    let barrier = Barrier::new(callers + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..callers)
            .map(|t| {
                let (barrier, setup) = (&barrier, &setup);
                scope.spawn(move || -> Result<Vec<Duration>> {
                    let ready = setup(t).and_then(|mut call| {
                        (0..WARM_UP_CALLS).try_for_each(|_| call())?;
                        Ok(call)
                    });
                    // Every thread reaches the barrier, even one whose set-up failed.
                    barrier.wait();
                    let mut call = ready?;
                    let (start, mut latencies) = (Instant::now(), Vec::new());
                    while start.elapsed().as_secs_f64() < seconds {
                        let begun = Instant::now();
                        call()?;
                        latencies.push(begun.elapsed());
                    }
                    Ok(latencies)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.append(&mut worker.join().map_err(|_| anyhow!("a caller panicked"))??);
        }
        Ok((latencies.len() as f64 / start.elapsed().as_secs_f64(), latencies))
    })
}

/// `runs` runs of [`run`]: the median calls per second, and the 50th and 99th percentiles of
/// every call's latency in microseconds.
pub fn measure<C: FnMut() -> Result<()>>(
    runs: usize,
    callers: usize,
    seconds: f64,
    setup: impl Fn(usize) -> Result<C> + Sync,
) -> Result<(f64, f64, f64)> {
    let (mut rates, mut latencies) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let (rate, mut own) = run(callers, seconds, &setup)?;
        rates.push(rate);
        latencies.append(&mut own);
    }
    rates.sort_by(f64::total_cmp);
    latencies.sort();
    let percentile = |p: f64| {
        let at = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies.get(at).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
    };
    Ok((rates[rates.len() / 2], percentile(0.5), percentile(0.99)))
}
