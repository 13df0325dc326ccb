//! Loads weight files with `StateDict::from_file` and prints, per file, what came, how long it
//! took and (on Linux) the peak resident memory the load added: a tool to measure the loader on
//! real or crafted files. The hostile-input tests write their crafted files to
//! `TCH_MIX_HOSTILE_OUT=DIR`.
//!
//! ```text
//! cargo run --release --example load -- FILE...
//! ```
//!
//! The peak is the kernel's high-water mark of resident memory (`VmHWM`), reset before each
//! load (`/proc/self/clear_refs`), minus the resident memory at that moment: libtorch's own
//! start-up (some 500 MiB here) is left out, which `/usr/bin/time`'s maximum cannot do.

use std::time::Instant;

use tch_mix::StateDict;

/// A `/proc/self/status` entry in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the high-water mark of resident memory and returns the resident memory now, in KiB.
fn reset_peak() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    status_kib("VmRSS:")
}

fn main() {
    for path in std::env::args().skip(1) {
        let before = reset_peak();
        let start = Instant::now();
        let result = StateDict::from_file(&path);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let peak = match (before, status_kib("VmHWM:")) {
            (Some(before), Some(peak)) => {
                format!(", peak +{:.1} MiB", peak.saturating_sub(before) as f64 / 1024.0)
            }
            _ => String::new(),
        };
        match result {
            Ok(state) => {
                let elements: usize = state.iter().map(|(_, t)| t.numel()).sum();
                println!("{path}: {ms:.1} ms{peak}, {} tensors, {elements} elements", state.len());
            }
            Err(err) => println!("{path}: {ms:.1} ms{peak}, error: {err}"),
        }
    }
}
