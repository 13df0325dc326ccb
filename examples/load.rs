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

#[path = "common/memory.rs"]
mod memory;
use memory::{peak_mib, reset_peak};

fn main() {
    for path in std::env::args().skip(1) {
        let before = reset_peak();
        let start = Instant::now();
        let result = StateDict::from_file(&path);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let peak = peak_mib(before).map_or(String::new(), |mib| format!(", peak +{mib:.1} MiB"));
        match result {
            Ok(state) => {
                let elements: usize = state.iter().map(|(_, t)| t.numel()).sum();
                println!("{path}: {ms:.1} ms{peak}, {} tensors, {elements} elements", state.len());
            }
            Err(err) => println!("{path}: {ms:.1} ms{peak}, error: {err}"),
        }
    }
}
