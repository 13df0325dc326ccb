//! The timing both peer benchmarks share (examples/bench_torchscript.rs and bench-peers/ort),
//! included by `#[path]` (the ORT one must not depend on the tch-mix package, which links
//! libtorch); both use anyhow.

use std::time::Instant;

use anyhow::Result;

/// How long calls run before any is timed (as in `tch-mix bench`).
const WARM_UP: std::time::Duration = std::time::Duration::from_millis(200);

/// The median wall time of `reps` calls in milliseconds, after a few calls and at least
/// [`WARM_UP`] of them (as `tch-mix bench`).
pub fn median_ms(reps: usize, mut call: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    let mut calls = 0;
    while calls < reps.clamp(2, 5) || start.elapsed() < WARM_UP {
        call()?;
        calls += 1;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        call()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
