//! What this machine allows, for the floors of `scripts/bench`: the copy bandwidth of a large
//! `Tensor::copy_` and the peak GFLOP/s of libtorch's sgemm (MKL on pip's torch) on the shapes the
//! mixers multiply, both with the bench's thread count.
//!
//! ```text
//! cargo run --release --example bench_machine -- [--threads N] [--reps R] [--copy-elements N,N,...]
//! ```
//!
//! Copy bandwidth counts the bytes read and the bytes written (a copy of 256 MiB moves 512 MiB),
//! as memory traffic is counted in the floors. Beside memory's (a 256 MiB copy), it is measured
//! for a copy of each `--copy-elements` float32 values, repeated on the same buffers as the bench
//! repeats its input, so that an input that stays in the caches is held to the caches' bandwidth
//! (and to what one libtorch copy of it costs), not memory's. One `copy elements=N gbs=X` line per
//! size; the last line is machine-readable: `machine threads=N copy_gbs=... sgemm_gflops=...`
//! (memory's bandwidth, the best of the sgemm shapes).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// The bandwidth of `dst.copy_(src)` on `elements` float32 values, in GB/s read + written.
fn copy_gbs(elements: i64, reps: usize) -> Result<f64> {
    let src = Tensor::f_randn([elements], (Kind::Float, Device::Cpu))?;
    let mut dst = Tensor::f_zeros([elements], (Kind::Float, Device::Cpu))?;
    let seconds = median_s(reps, || {
        dst.copy_(&src);
    });
    Ok(2.0 * elements as f64 * 4.0 / seconds / 1e9)
}

/// The median wall time of `reps` calls in seconds, after two warm-up calls.
fn median_s(reps: usize, mut call: impl FnMut()) -> f64 {
    call();
    call();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            call();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<()> {
    let (mut threads, mut reps, mut sizes) = (None, 9, Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<i64>().with_context(|| format!("{flag}: not a number"));
        match flag.as_str() {
            "--threads" => threads = Some(number()? as i32),
            "--reps" => reps = number()?.max(1) as usize,
            "--copy-elements" => {
                for size in value.split(',') {
                    sizes.push(size.parse::<i64>().with_context(|| format!("{flag}: {size}"))?);
                }
            }
            other => bail!("unknown option {other}"),
        }
    }
    if let Some(threads) = threads {
        tch::set_num_threads(threads);
    }
    let threads = tch::get_num_threads();
    let _guard = tch::no_grad_guard();
    let options = (Kind::Float, Device::Cpu);

    for &elements in &sizes {
        // Enough calls for a stable median of small copies: some 0.1 s of copying each.
        let calls = (25_000_000 / elements.max(1)).clamp(reps as i64, 2000) as usize;
        let gbs = copy_gbs(elements, calls)?;
        println!("copy elements={elements} gbs={gbs:.2}");
    }
    // 256 MiB each way: far beyond the caches, so this is memory, not L3.
    let copy_gbs = copy_gbs(64 << 20, reps)?;
    println!("copy 256 MiB: {copy_gbs:.1} GB/s (read + write)");

    // (rows, in, out) of `Tensor::linear`, as the mixers' projections call it: self-attention's
    // query/key projection at batch 8192 (16 features), the attention mixers' (D, D)
    // projections of pooled rows, the InstanceWeightsMixer's (F D) -> F projection.
    let shapes = [(131072, 256, 512), (8192, 256, 256), (8192, 4096, 16), (4096, 256, 512)];
    let mut peak: f64 = 0.0;
    for (m, k, n) in shapes {
        let a = Tensor::f_randn([m, k], options)?;
        let w = Tensor::f_randn([n, k], options)?;
        let b = Tensor::f_randn([n], options)?;
        let seconds = median_s(reps, || {
            drop(a.linear(&w, Some(&b)));
        });
        let gflops = 2.0 * (m * k * n) as f64 / seconds / 1e9;
        println!("sgemm ({m}, {k}) x ({k}, {n}): {:.3} ms, {gflops:.1} GFLOP/s", seconds * 1e3);
        peak = peak.max(gflops);
    }
    println!("machine threads={threads} copy_gbs={copy_gbs:.2} sgemm_gflops={peak:.1}");
    Ok(())
}
