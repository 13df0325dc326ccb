//! Measures saving and loading a state dict of about 100 MB (float32 weights of transformer-like
//! shapes) in both formats: the time of `StateDict::save` (fsync included) and
//! `StateDict::from_file`, and the peak resident memory each added (as `examples/load.rs`
//! measures it: the kernel's high-water mark, reset before each step, minus the resident memory
//! at that moment). The loaded state is checked against the saved one, bit for bit.
//!
//! ```text
//! cargo run --release --example save_load -- [MIB] [DIR]    (default 100 MiB, the temp folder)
//! ```

use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tch_mix::StateDict;

#[path = "common/memory.rs"]
mod memory;
use memory::{peak_mib, reset_peak};

/// Runs `f`, returning its result, its time in ms and the peak memory it added in MiB.
fn measure<T>(f: impl FnOnce() -> T) -> (T, f64, Option<f64>) {
    let before = reset_peak();
    let start = Instant::now();
    let out = f();
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let peak = peak_mib(before);
    (out, ms, peak)
}

fn main() -> tch_mix::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: i64 = args.next().map_or(100, |a| a.parse().expect("MIB: a number"));
    let dir = args.next().map_or_else(std::env::temp_dir, Into::into);
    tch::manual_seed(0);
    // Layers of a (1024 x 1024) projection, a (1024 x 4096) and a (4096 x 1024) MLP and their
    // biases: 9 M floats (36 MiB) a layer, until the total passes `mib`.
    let mut entries = Vec::new();
    let mut bytes = 0i64;
    let mut layer = 0;
    while bytes < mib << 20 {
        for (name, shape) in [
            ("attention.weight", vec![1024, 1024]),
            ("attention.bias", vec![1024]),
            ("mlp.up.weight", vec![4096, 1024]),
            ("mlp.up.bias", vec![4096]),
            ("mlp.down.weight", vec![1024, 4096]),
            ("mlp.down.bias", vec![1024]),
        ] {
            let t = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            bytes += t.numel() as i64 * 4;
            entries.push((format!("layers.{layer}.{name}"), t));
        }
        layer += 1;
    }
    let state = StateDict::new(entries);
    println!(
        "{} tensors, {:.1} MiB of float32; peak = resident memory added at most",
        state.len(),
        bytes as f64 / (1 << 20) as f64
    );
    let show = |peak: Option<f64>| peak.map_or("n/a".to_string(), |p| format!("+{p:.1} MiB"));
    for ext in ["safetensors", "pt"] {
        let path = dir.join(format!("tch-mix-save-load-{}.{ext}", std::process::id()));
        let (saved, save_ms, save_peak) = measure(|| state.save(&path));
        saved?;
        let (loaded, load_ms, load_peak) = measure(|| StateDict::from_file(&path));
        let loaded = loaded?;
        for (key, t) in state.iter() {
            assert!(t.equal(loaded.get(key).expect("every key")), "{key} differs");
        }
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
        println!(
            ".{ext:<12} file {size:.1} MiB   save {save_ms:7.1} ms, peak {:>10}   load {load_ms:7.1} ms, peak {:>10}",
            show(save_peak),
            show(load_peak)
        );
        drop(loaded);
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}
