//! The TorchScript peer of `scripts/bench`: swak's mixers traced by `scripts/export_peers.py`,
//! loaded with `tch::CModule` and timed from Rust under `no_grad`, as a service that chose
//! TorchScript would run them.
//!
//! ```text
//! cargo run --release --example bench_torchscript -- --dir DIR --mixer M --batch B [--reps R] [--threads N]
//! ```
//!
//! Every variant in DIR (`{mixer}.{forward,importance}.ts-*.pt`: fast path on or off, plain or
//! frozen) is first run on `input-{B}.safetensors` and checked against swak's outputs in
//! `{mixer}.ref-{B}.safetensors`; a variant that fails the check is reported and not timed. Of
//! those that pass, the fastest forward and the fastest importance count, and "both" is the two
//! of them one after the other (TorchScript has no call that returns both). One line per variant,
//! then a machine-readable last line like `tch-mix bench`'s.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{CModule, IValue, Kind, Tensor};

#[path = "../bench-peers/common/median.rs"]
mod median;
#[path = "../bench-peers/common/variants.rs"]
mod variants;
use median::median_ms;
use variants::{accepted, variants};

struct Options {
    dir: PathBuf,
    mixer: String,
    batch: i64,
    reps: usize,
    threads: Option<i32>,
}

fn parse() -> Result<Options> {
    let mut options =
        Options { dir: PathBuf::new(), mixer: String::new(), batch: 0, reps: 20, threads: None };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        let number =
            || value.parse::<i64>().with_context(|| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--dir" => options.dir = value.clone().into(),
            "--mixer" => options.mixer = value.clone(),
            "--batch" => options.batch = number()?,
            "--reps" => options.reps = number()?.max(1) as usize,
            "--threads" => options.threads = Some(number()? as i32),
            other => bail!("unknown option {other}"),
        }
    }
    if options.mixer.is_empty() || options.batch < 1 {
        bail!("usage: bench_torchscript --dir DIR --mixer M --batch B [--reps R] [--threads N]");
    }
    Ok(options)
}

/// The tensor `name` of a safetensors file.
fn read_tensor(path: &Path, name: &str) -> Result<Tensor> {
    let tensors =
        Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
    tensors
        .into_iter()
        .find(|(key, _)| key == name)
        .map(|(_, tensor)| tensor)
        .with_context(|| format!("{} has no tensor {name:?}", path.display()))
}

/// `max |ours - expected| / max |expected|`, or an error if the shapes differ.
fn relative_error(ours: &Tensor, expected: &Tensor) -> Result<f64> {
    if ours.size() != expected.size() {
        bail!("shape {:?}, swak's is {:?}", ours.size(), expected.size());
    }
    let expected = expected.f_to_kind(Kind::Double)?;
    let diff = ours.f_to_kind(Kind::Double)?.f_sub(&expected)?.f_abs()?.f_max()?.double_value(&[]);
    let scale = expected.f_abs()?.f_max()?.double_value(&[]).max(f64::MIN_POSITIVE);
    Ok(diff / scale)
}

fn run(module: &CModule, inp: &Tensor) -> Result<Tensor> {
    match module.forward_is(&[IValue::Tensor(inp.shallow_clone())])? {
        IValue::Tensor(out) => Ok(out),
        other => bail!("the module returned {other:?}, not a tensor"),
    }
}

/// A checked variant and its median.
struct Timed {
    variant: String,
    module: CModule,
    err: f64,
    ms: f64,
}

/// Loads, checks and times every variant of one function; returns the fastest that passed.
fn fastest(options: &Options, function: &str, inp: &Tensor, expected: &Tensor) -> Result<Timed> {
    let prefix = format!("{}.{function}.", options.mixer);
    let mut best: Option<Timed> = None;
    for (variant, file) in variants(&options.dir, &prefix, ".pt")? {
        let mut module =
            CModule::load(&file).with_context(|| format!("loading {}", file.display()))?;
        module.set_eval();
        let Some(err) = accepted(
            &variant,
            function,
            run(&module, inp).and_then(|out| relative_error(&out, expected)),
        ) else {
            continue;
        };
        let ms = median_ms(options.reps, || run(&module, inp).map(drop))?;
        println!("variant={variant} function={function} ms={ms:.4} err={err:.1e}");
        if best.as_ref().is_none_or(|b| ms < b.ms) {
            best = Some(Timed { variant, module, err, ms });
        }
    }
    best.with_context(|| format!("no {prefix}ts-*.pt in {} passed", options.dir.display()))
}

fn main() -> Result<()> {
    let options = parse()?;
    if let Some(threads) = options.threads {
        tch::set_num_threads(threads);
    }
    let _guard = tch::no_grad_guard();
    let inp =
        read_tensor(&options.dir.join(format!("input-{}.safetensors", options.batch)), "input")?;
    let reference =
        options.dir.join(format!("{}.ref-{}.safetensors", options.mixer, options.batch));
    let forward = fastest(&options, "forward", &inp, &read_tensor(&reference, "forward")?)?;
    let importance =
        fastest(&options, "importance", &inp, &read_tensor(&reference, "importance")?)?;
    let both = median_ms(options.reps, || {
        drop(run(&forward.module, &inp)?);
        run(&importance.module, &inp).map(drop)
    })?;
    println!(
        "torchscript {} input {:?} float32, {} threads, median of {}, torch {}",
        options.mixer,
        inp.size(),
        tch::get_num_threads(),
        options.reps,
        std::env::var("TCH_MIX_TORCH").unwrap_or_else(|_| "?".into())
    );
    println!(
        "peer=torchscript mixer={} batch={} forward_ms={:.4} importance_ms={:.4} both_ms={both:.4} forward_variant={} importance_variant={} forward_err={:.1e} importance_err={:.1e}",
        options.mixer,
        options.batch,
        forward.ms,
        importance.ms,
        forward.variant,
        importance.variant,
        forward.err,
        importance.err
    );
    Ok(())
}
