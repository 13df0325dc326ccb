//! The timing both peer benchmarks share (examples/bench_torchscript.rs and bench-peers/ort),
//! included by `#[path]` (the ORT one must not depend on the tch-mix package, which links
//! libtorch); both use anyhow.

use std::time::Instant;

use anyhow::Result;

/// The median wall time of `reps` calls in milliseconds, after warm-up (as `tch-mix bench`).
pub fn median_ms(reps: usize, mut call: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..reps.clamp(2, 5) {
        call()?;
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
