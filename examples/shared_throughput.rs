//! Throughput of 8 threads serving from one `SharedMixer`, against 8 private mixers (one per
//! thread) and one mixer behind a `Mutex`: calls per second, median of 5 runs each.
//!
//!     cargo run --release --example shared_throughput [-- BATCH]   (default batch 16)

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};
use tch_mix::{AttentionConfig, CrossAttentionMixer, Mixer, SharedMixer};

const THREADS: usize = 8;
const CALLS: usize = 2000;

/// Calls per second of `THREADS` threads making `CALLS` calls each with `call(thread, input)`.
fn throughput(call: impl Fn(usize, &Tensor) + Sync, batch: i64) -> f64 {
    let inputs: Vec<Tensor> =
        (0..THREADS).map(|_| Tensor::randn([batch, 16, 256], (Kind::Float, Device::Cpu))).collect();
    let inputs: Vec<Mutex<Tensor>> = inputs.into_iter().map(Mutex::new).collect();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (t, input) in inputs.iter().enumerate() {
            let call = &call;
            scope.spawn(move || {
                tch::set_num_threads(1);
                let input = input.lock().unwrap().shallow_clone();
                for _ in 0..CALLS {
                    call(t, &input);
                }
            });
        }
    });
    (THREADS * CALLS) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn main() -> Result<(), tch_mix::MixError> {
    let batch: i64 = std::env::args().nth(1).map_or(16, |b| b.parse().expect("a batch size"));
    let config = AttentionConfig { n_heads: 4, ..Default::default() };
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = CrossAttentionMixer::new(&vs.root(), 256, config)?;
    let shared = Arc::new(SharedMixer::new(&mix)?);
    let private: Vec<Mutex<SharedMixer>> =
        (0..THREADS).map(|_| SharedMixer::new(&mix).map(Mutex::new)).collect::<Result<_, _>>()?;
    let locked = Mutex::new(mix);
    let forward = |mix: &CrossAttentionMixer, x: &Tensor| {
        tch::no_grad(|| mix.f_forward_t(x, None, false)).map(drop)
    };
    let mut rows = Vec::new();
    for _ in 0..5 {
        rows.push((
            throughput(|_, x| drop(shared.forward(x, None)), batch),
            // Each thread's own copy: its lock is never contended.
            throughput(|t, x| drop(private[t].lock().unwrap().forward(x, None)), batch),
            throughput(|_, x| drop(forward(&locked.lock().unwrap(), x)), batch),
        ));
    }
    let column = |pick: fn(&(f64, f64, f64)) -> f64| median(rows.iter().map(pick).collect());
    println!(
        "cross-attention, batch {batch} x 16 x 256 f32, {THREADS} threads x {CALLS} calls, calls/s (median of 5):"
    );
    println!("  one SharedMixer shared by all threads: {:.0}", column(|r| r.0));
    println!("  a private mixer per thread:            {:.0}", column(|r| r.1));
    println!("  one mixer behind a Mutex:              {:.0}", column(|r| r.2));
    Ok(())
}
