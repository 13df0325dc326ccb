//! The ONNX Runtime peer of tch-mix's `scripts/bench`: swak's mixers exported to ONNX by
//! `scripts/export_peers.py`, run by the `ort` crate on the `libonnxruntime` that pip's
//! `onnxruntime` wheel ships (loaded at run time: this binary links neither ONNX Runtime nor
//! libtorch), as a service that chose ONNX Runtime would run them.
//!
//! ```text
//! tch-mix-bench-ort --lib LIBONNXRUNTIME --dir DIR --mixer M --batch B [--reps R] [--threads N]
//!                   [--session-pools] [--callers 1,2,4 --seconds S --runs R]
//! ```
//!
//! Sessions: all graph optimisations, sequential execution, on one global thread pool of N intra-op
//! threads (default 2) and one inter-op thread that the forward and importance sessions share, as
//! a service running both would set it up (a pool per session would leave twice N threads
//! spinning on N cores when the two run back to back; `--session-pools` sets that up instead, to
//! compare); the input tensor is created once. Every graph in DIR
//! (`{mixer}.{forward,importance}.onnx-*.onnx`, one per exporter) is first run on
//! `input-{B}.safetensors` and checked against swak's outputs in `{mixer}.ref-{B}.safetensors`; a
//! graph that fails the check is reported and not timed. Of those that pass, the fastest forward
//! and the fastest importance count, and "both" is the two sessions one after the other. One line
//! per graph, then a machine-readable last line like `tch-mix bench`'s.
//!
//! With `--callers`, the fastest forward graph also serves concurrent callers, as
//! `examples/concurrency.rs` times tch-mix: for each number of callers, that many threads, each
//! with a session of its own (`Session::run` takes `&mut self`) on the one global thread pool,
//! call it on their own copy of the input for `--seconds`, `--runs` times; one line
//! `concurrency mixer=.. batch=.. callers=.. setting=onnxruntime calls_per_s=.. p50_us=..
//! p99_us=..` per number of callers (throughput: the median run; percentiles: every call).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use safetensors::SafeTensors;

#[path = "../../common/callers.rs"]
mod callers;
#[path = "../../common/median.rs"]
mod median;
#[path = "../../common/variants.rs"]
mod variants;
use median::median_ms;
use variants::{accepted, variants};

struct Options {
    lib: PathBuf,
    dir: PathBuf,
    mixer: String,
    batch: i64,
    reps: usize,
    threads: usize,
    session_pools: bool,
    callers: Vec<usize>,
    seconds: f64,
    runs: usize,
}

fn parse() -> Result<Options> {
    let mut options = Options {
        lib: PathBuf::new(),
        dir: PathBuf::new(),
        mixer: String::new(),
        batch: 0,
        reps: 20,
        threads: 2,
        session_pools: false,
        callers: Vec::new(),
        seconds: 0.4,
        runs: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--session-pools" {
            options.session_pools = true;
            continue;
        }
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        let number =
            || value.parse::<i64>().with_context(|| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--lib" => options.lib = value.clone().into(),
            "--dir" => options.dir = value.clone().into(),
            "--mixer" => options.mixer = value.clone(),
            "--batch" => options.batch = number()?,
            "--reps" => options.reps = number()?.max(1) as usize,
            "--threads" => options.threads = number()?.max(1) as usize,
            "--callers" => {
                options.callers = value
                    .split(',')
                    .map(|v| v.trim().parse().with_context(|| format!("--callers: {v:?}")))
                    .collect::<Result<_>>()?
            }
            "--seconds" => options.seconds = value.parse().context("--seconds: not a number")?,
            "--runs" => options.runs = number()?.max(1) as usize,
            other => bail!("unknown option {other}"),
        }
    }
    if options.lib.as_os_str().is_empty() || options.mixer.is_empty() || options.batch < 1 {
        bail!("usage: tch-mix-bench-ort --lib LIBONNXRUNTIME --dir DIR --mixer M --batch B [--reps R] [--threads N]");
    }
    Ok(options)
}

/// A float32 tensor of a safetensors file: its shape and values.
fn read_tensor(path: &Path, name: &str) -> Result<(Vec<i64>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes).with_context(|| format!("{}", path.display()))?;
    let view = file.tensor(name).with_context(|| format!("{}: {name}", path.display()))?;
    if view.dtype() != safetensors::Dtype::F32 {
        bail!("{}: {name} is {:?}, not F32", path.display(), view.dtype());
    }
    let values =
        view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok((view.shape().iter().map(|&d| d as i64).collect(), values))
}

/// `max |ours - expected| / max |expected|`, or an error if the shapes differ.
fn relative_error(ours: (&[i64], &[f32]), expected: &(Vec<i64>, Vec<f32>)) -> Result<f64> {
    if ours.0 != expected.0.as_slice() {
        bail!("shape {:?}, swak's is {:?}", ours.0, expected.0);
    }
    let diff = ours
        .1
        .iter()
        .zip(&expected.1)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = expected.1.iter().map(|b| (*b as f64).abs()).fold(f64::MIN_POSITIVE, f64::max);
    Ok(diff / scale)
}

/// A session on the environment's global thread pool, or with a pool of its own.
fn session(environment: &Environment, file: &Path, options: &Options) -> ort::Result<Session> {
    let builder = Session::builder(environment)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_parallel_execution(false)?;
    let mut builder = match options.session_pools {
        true => builder.with_intra_threads(options.threads)?.with_inter_threads(1)?,
        false => builder,
    };
    builder.commit_from_file(file)
}

/// Runs `session` on `inp` and checks its one output against `expected`.
fn check(session: &mut Session, inp: &Tensor<f32>, expected: &(Vec<i64>, Vec<f32>)) -> Result<f64> {
    let outputs = session.run(ort::inputs![inp])?;
    if outputs.len() != 1 {
        bail!("{} outputs, expected 1", outputs.len());
    }
    let (shape, values) = outputs[0].try_extract_tensor::<f32>()?;
    relative_error((shape, values), expected)
}

/// A checked graph and its median.
struct Timed {
    variant: String,
    file: PathBuf,
    session: Session,
    err: f64,
    ms: f64,
}

/// Loads, checks and times every graph of one function; returns the fastest that passed.
fn fastest(
    environment: &Environment,
    options: &Options,
    function: &str,
    inp: &Tensor<f32>,
    expected: &(Vec<i64>, Vec<f32>),
) -> Result<Timed> {
    let prefix = format!("{}.{function}.", options.mixer);
    let mut best: Option<Timed> = None;
    for (variant, file) in variants(&options.dir, &prefix, ".onnx")? {
        let mut session = session(environment, &file, options)
            .with_context(|| format!("loading {}", file.display()))?;
        let Some(err) = accepted(&variant, function, check(&mut session, inp, expected)) else {
            continue;
        };
        let ms = median_ms(options.reps, || {
            session.run(ort::inputs![inp])?;
            Ok(())
        })?;
        println!("variant={variant} function={function} ms={ms:.4} err={err:.1e}");
        if best.as_ref().is_none_or(|b| ms < b.ms) {
            best = Some(Timed { variant, file, session, err, ms });
        }
    }
    best.with_context(|| format!("no {prefix}onnx-*.onnx in {} passed", options.dir.display()))
}

/// Every `--callers` count on the forward graph `file`: one `concurrency` line each.
fn concurrency(
    environment: &Environment,
    file: &Path,
    options: &Options,
    input: &(Vec<i64>, Vec<f32>),
) -> Result<()> {
    for &callers in &options.callers {
        // Each caller its own session (`run` takes `&mut self`) and input, on its own thread.
        let setup = |_| -> Result<_> {
            let mut session = session(environment, file, options)?;
            let inp = Tensor::from_array(input.clone())?;
            Ok(move || session.run(ort::inputs![&inp]).map(drop).map_err(Into::into))
        };
        let (rate, p50, p99) = callers::measure(options.runs, callers, options.seconds, setup)?;
        println!(
            "concurrency mixer={} batch={} callers={callers} setting=onnxruntime \
             calls_per_s={:.0} p50_us={:.2} p99_us={:.2}",
            options.mixer, options.batch, rate, p50, p99
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let options = parse()?;
    // init_from loads the library; the thread pool's options are made by it.
    let builder = ort::init_from(&options.lib)
        .with_context(|| format!("loading {}", options.lib.display()))?;
    let threads = GlobalThreadPoolOptions::default()
        .with_intra_threads(options.threads)?
        .with_inter_threads(1)?;
    let builder = builder.with_name("tch-mix-bench");
    let environment = match options.session_pools {
        true => builder.build()?,
        false => builder.with_global_thread_pool(threads).build()?,
    };
    let input =
        read_tensor(&options.dir.join(format!("input-{}.safetensors", options.batch)), "input")?;
    let shape = input.0.clone();
    let inp = Tensor::from_array(input.clone())?;
    let reference =
        options.dir.join(format!("{}.ref-{}.safetensors", options.mixer, options.batch));
    let mut forward =
        fastest(&environment, &options, "forward", &inp, &read_tensor(&reference, "forward")?)?;
    if !options.callers.is_empty() {
        return concurrency(&environment, &forward.file, &options, &input);
    }
    let mut importance = fastest(
        &environment,
        &options,
        "importance",
        &inp,
        &read_tensor(&reference, "importance")?,
    )?;
    let both = median_ms(options.reps, || {
        forward.session.run(ort::inputs![&inp])?;
        importance.session.run(ort::inputs![&inp])?;
        Ok(())
    })?;
    println!(
        "onnxruntime {} input {shape:?} float32, {} intra-op threads ({}), median of {}, {}",
        options.mixer,
        options.threads,
        if options.session_pools { "a pool per session" } else { "one global pool" },
        options.reps,
        options.lib.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    );
    println!(
        "peer=onnxruntime mixer={} batch={} forward_ms={:.4} importance_ms={:.4} both_ms={both:.4} forward_variant={} importance_variant={} forward_err={:.1e} importance_err={:.1e}",
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
