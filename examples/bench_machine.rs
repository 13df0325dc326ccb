//! What this machine allows, for the floors of `scripts/bench`: memory bandwidth, and the peak
//! GFLOP/s of libtorch's sgemm (MKL on pip's torch) on the shapes the mixers multiply, with the
//! bench's thread count.
//!
//! ```text
//! cargo run --release --example bench_machine -- [--threads N] [--reps R] [--elements N,N,...]
//! ```
//!
//! - copy: `dst.copy_(src)` on 256 MiB, far beyond the caches; its bandwidth counts the bytes read
//!   and the bytes written (a copy of 256 MiB moves 512 MiB).
//! - read: `Tensor::sum` over each `--elements` float32 values (the bench passes its inputs'
//!   sizes), repeated on the same tensor as the bench repeats its input, so that an input that
//!   stays in the caches is held to the caches' bandwidth (and to what one libtorch reduction over
//!   it costs), not memory's. A copy is no measure there: its destination doubles the working set.
//! - sgemm: `Tensor::linear` on the mixers' projection shapes; the peak is the best of them.
//!
//! Each figure is the best of R calls after warm-up, not their median: a floor takes what the
//! machine can do, and the other VMs on the host only ever slow it. Lines `read elements=N gbs=X`,
//! then the machine-readable last line `machine threads=N copy_gbs=... sgemm_gflops=...`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// The shortest wall time of `reps` calls in seconds, after two warm-up calls.
fn best_s(reps: usize, mut call: impl FnMut()) -> f64 {
    call();
    call();
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            call();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
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
            "--elements" => {
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

    let elements = 64 << 20;
    let src = Tensor::f_randn([elements], options)?;
    let mut dst = Tensor::f_zeros([elements], options)?;
    let seconds = best_s(reps, || {
        dst.copy_(&src);
    });
    let copy_gbs = 2.0 * elements as f64 * 4.0 / seconds / 1e9;
    println!("copy 256 MiB: {:.2} ms, {copy_gbs:.1} GB/s (read + write)", seconds * 1e3);
    drop((src, dst));

    for &elements in &sizes {
        let tensor = Tensor::f_randn([elements], options)?;
        // Enough calls for small sizes: some 0.1 s of reading each.
        let calls = (25_000_000 / elements.max(1)).clamp(reps as i64, 2000) as usize;
        let seconds = best_s(calls, || drop(tensor.sum(Kind::Float)));
        println!("read elements={elements} gbs={:.2}", elements as f64 * 4.0 / seconds / 1e9);
    }

    // (rows, in, out) of `Tensor::linear`, as the mixers' projections call it: self-attention's
    // query/key projection at batch 8192 (16 features), the attention mixers' (D, D)
    // projections of pooled rows, the InstanceWeightsMixer's (F D) -> F projection.
    let shapes = [(131072, 256, 512), (8192, 256, 256), (8192, 4096, 16), (4096, 256, 512)];
    let mut peak: f64 = 0.0;
    for (m, k, n) in shapes {
        let a = Tensor::f_randn([m, k], options)?;
        let w = Tensor::f_randn([n, k], options)?;
        let b = Tensor::f_randn([n], options)?;
        let seconds = best_s(reps, || drop(a.linear(&w, Some(&b))));
        let gflops = 2.0 * (m * k * n) as f64 / seconds / 1e9;
        println!("sgemm ({m}, {k}) x ({k}, {n}): {:.3} ms, {gflops:.1} GFLOP/s", seconds * 1e3);
        peak = peak.max(gflops);
    }
    println!("machine threads={threads} copy_gbs={copy_gbs:.2} sgemm_gflops={peak:.1}");
    Ok(())
}
