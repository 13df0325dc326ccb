//! Concurrent callers on one `SharedMixer`: calls per second and latency percentiles of N
//! threads calling at once, each mixer at each batch size, in two settings:
//!
//! - `default`: the library's defaults, nothing set by the caller;
//! - `1 thread`: `tch::set_num_threads(1)` in every calling thread, the usual hand tuning
//!   for a service with as many request threads as cores.
//!
//! ```text
//! cargo run --release --example concurrency [-- --callers 1,2,4,8,16] [--batches 1,16,256]
//!     [--mixers global,instance,cross,self] [--seconds 0.4] [--runs 3]
//!     [--mod-dim 256] [--n-features 16] [--n-heads 4]
//! ```
//!
//! Freshly initialised weights (speed does not depend on their values), float32, no-grad
//! forward. Each cell runs `--runs` times for `--seconds` each, after a warm-up; throughput is
//! the median of the runs, the percentiles come from every call of every run. One line per cell, then a machine-readable line
//! (`concurrency mixer=.. batch=.. callers=.. setting=.. calls_per_s=.. p50_us=.. p99_us=..`).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind, Tensor};
use tch_mix::{
    AttentionConfig, CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, Mixer,
    SelfAttentionMixer, SharedMixer,
};

#[path = "../bench-peers/common/callers.rs"]
mod callers;

struct Options {
    mod_dim: i64,
    n_features: i64,
    n_heads: i64,
    callers: Vec<usize>,
    batches: Vec<i64>,
    mixers: Vec<String>,
    seconds: f64,
    runs: usize,
}

fn list<T: std::str::FromStr>(flag: &str, value: &str) -> Result<Vec<T>> {
    value
        .split(',')
        .map(|v| v.trim().parse().ok().with_context(|| format!("{flag}: not a number: {v:?}")))
        .collect()
}

fn parse() -> Result<Options> {
    let mut options = Options {
        mod_dim: 256,
        n_features: 16,
        n_heads: 4,
        callers: vec![1, 2, 4, 8, 16],
        batches: vec![1, 16, 256],
        mixers: ["global", "instance", "cross", "self"].map(String::from).to_vec(),
        seconds: 0.4,
        runs: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--mod-dim" => options.mod_dim = list(&flag, &value)?[0],
            "--n-features" => options.n_features = list(&flag, &value)?[0],
            "--n-heads" => options.n_heads = list(&flag, &value)?[0],
            "--callers" => options.callers = list(&flag, &value)?,
            "--batches" => options.batches = list(&flag, &value)?,
            "--mixers" => options.mixers = value.split(',').map(String::from).collect(),
            "--seconds" => options.seconds = value.parse().context("--seconds: not a number")?,
            "--runs" => options.runs = list::<usize>(&flag, &value)?[0].max(1),
            other => bail!("unknown option {other}"),
        }
    }
    Ok(options)
}

fn build(name: &str, options: &Options, path: &nn::Path) -> Result<Box<dyn Mixer>> {
    let (d, f) = (options.mod_dim, options.n_features);
    let attention = AttentionConfig { n_heads: options.n_heads, ..Default::default() };
    Ok(match name {
        "global" => Box::new(GlobalWeightsMixer::new(path, d, f, Default::default())?),
        "instance" => Box::new(InstanceWeightsMixer::new(path, d, f, Default::default())?),
        "cross" => Box::new(CrossAttentionMixer::new(path, d, attention)?),
        "self" => Box::new(SelfAttentionMixer::new(path, d, attention)?),
        other => bail!("--mixers: expected global, instance, cross or self, got {other:?}"),
    })
}

fn main() -> Result<()> {
    let options = parse()?;
    let threads = tch::get_num_threads();
    println!(
        "concurrent callers on one SharedMixer: {} x {} f32, {} heads, no-grad forward, {} \
         threads by default; median of {} runs of {} s",
        options.n_features,
        options.mod_dim,
        options.n_heads,
        threads,
        options.runs,
        options.seconds
    );
    println!(
        "{:<9} {:>5} {:>7} {:<9} {:>12} {:>9} {:>9}",
        "mixer", "batch", "callers", "setting", "calls/s", "p50 us", "p99 us"
    );
    for name in &options.mixers {
        let vs = nn::VarStore::new(Device::Cpu);
        let mixer = Arc::new(SharedMixer::new(build(name, &options, &vs.root())?.as_ref())?);
        for &batch in &options.batches {
            for &callers in &options.callers {
                for (setting, one_thread) in [("default", false), ("1 thread", true)] {
                    let shape = [batch, options.n_features, options.mod_dim];
                    // Each caller its own batch, on its own thread.
                    let setup = |_| -> Result<_> {
                        if one_thread {
                            tch::set_num_threads(1);
                        }
                        let (mixer, inp) =
                            (&mixer, Tensor::f_randn(shape, (Kind::Float, Device::Cpu))?);
                        Ok(move || mixer.forward(&inp, None).map(drop).map_err(Into::into))
                    };
                    let (rate, p50, p99) =
                        callers::measure(options.runs, callers, options.seconds, setup)?;
                    // A caller's `set_num_threads` is also the setting that threads started
                    // later begin with: back to the default for the next cell.
                    tch::set_num_threads(threads);
                    println!(
                        "{name:<9} {batch:>5} {callers:>7} {setting:<9} {rate:>12.0} {p50:>9.1} \
                         {p99:>9.1}"
                    );
                    println!(
                        "concurrency mixer={name} batch={batch} callers={callers} setting={} \
                         calls_per_s={rate:.0} p50_us={p50:.2} p99_us={p99:.2}",
                        setting.replace(' ', "-")
                    );
                }
            }
        }
    }
    Ok(())
}
