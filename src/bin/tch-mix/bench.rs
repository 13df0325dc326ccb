//! `tch-mix bench`: median latency of forward, importance and both in one call, eval, no grad.
//!
//! With `--weights`, `--input` and `--expect` (files that scripts/export_peers.py writes), tch-mix
//! runs with the same weights on the same batch as the peers of scripts/bench, and its outputs are
//! checked against swak's before anything is timed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind, Tensor};
use tch_mix::fixture::kind_from_name;
use tch_mix::{
    load_var_store, AttentionConfig, CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer,
    Mixer, SelfAttentionMixer, StateDict,
};

/// Largest `max |ours - swak| / max |swak|` that `--expect` accepts (f32 sums in another order).
const TOLERANCE: f64 = 1e-4;

struct Options {
    mixer: String,
    mod_dim: i64,
    n_features: i64,
    n_heads: i64,
    batch: i64,
    dtype: String,
    device: Device,
    reps: usize,
    threads: Option<i32>,
    weights: Option<PathBuf>,
    input: Option<PathBuf>,
    expect: Option<PathBuf>,
    /// Also time the calls into buffers held across calls.
    into: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        mixer: String::new(),
        mod_dim: 0,
        n_features: 0,
        n_heads: 1,
        batch: 0,
        dtype: "float32".into(),
        device: Device::Cpu,
        reps: 20,
        threads: None,
        weights: None,
        input: None,
        expect: None,
        into: false,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        if flag == "--into" {
            options.into = true;
            continue;
        }
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        let number =
            || value.parse::<i64>().with_context(|| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--mixer" => options.mixer = value.clone(),
            "--mod-dim" => options.mod_dim = number()?,
            "--n-features" => options.n_features = number()?,
            "--n-heads" => options.n_heads = number()?,
            "--batch" => options.batch = number()?,
            "--dtype" => options.dtype = value.clone(),
            "--device" => options.device = crate::parse_device(value)?,
            "--reps" => options.reps = number()?.max(1) as usize,
            "--threads" => options.threads = Some(number()? as i32),
            "--weights" => options.weights = Some(value.into()),
            "--input" => options.input = Some(value.into()),
            "--expect" => options.expect = Some(value.into()),
            other => bail!("bench: unknown option {other}"),
        }
    }
    if options.mod_dim < 1 || options.n_features < 1 || options.batch < 1 {
        bail!("bench needs --mod-dim, --n-features and --batch of at least 1");
    }
    Ok(options)
}

fn build(options: &Options, path: &nn::Path) -> Result<Box<dyn Mixer>> {
    let (d, f) = (options.mod_dim, options.n_features);
    let attention = AttentionConfig { n_heads: options.n_heads, ..Default::default() };
    Ok(match options.mixer.as_str() {
        "global" => Box::new(GlobalWeightsMixer::new(path, d, f, Default::default())?),
        "instance" => Box::new(InstanceWeightsMixer::new(path, d, f, Default::default())?),
        "cross" => Box::new(CrossAttentionMixer::new(path, d, attention)?),
        "self" => Box::new(SelfAttentionMixer::new(path, d, attention)?),
        other => bail!("--mixer: expected global, instance, cross or self, got {other:?}"),
    })
}

/// The tensor `name` of a safetensors file, on `device` in `kind`.
fn read_tensor(path: &std::path::Path, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
    let tensors =
        Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, tensor) = tensors
        .into_iter()
        .find(|(key, _)| key == name)
        .with_context(|| format!("{} has no tensor {name:?}", path.display()))?;
    Ok(tensor.f_to_device(device)?.f_to_kind(kind)?)
}

/// `max |ours - expected| / max |expected|`, after checking that the shapes agree.
fn relative_error(what: &str, ours: &Tensor, expected: &Tensor) -> Result<f64> {
    if ours.size() != expected.size() {
        bail!("{what}: shape {:?}, swak's is {:?}", ours.size(), expected.size());
    }
    let expected = expected.f_to_kind(Kind::Double)?;
    let diff = ours.f_to_kind(Kind::Double)?.f_sub(&expected)?.f_abs()?.f_max()?.double_value(&[]);
    let scale = expected.f_abs()?.f_max()?.double_value(&[]).max(f64::MIN_POSITIVE);
    Ok(diff / scale)
}

/// How long calls run before any is timed (as in the peers' benchmarks and
/// scripts/bench_pytorch.py).
const WARM_UP: std::time::Duration = std::time::Duration::from_millis(200);

/// The median wall time of `reps` calls in milliseconds, after warm-up, device-synchronised.
fn median_ms(
    reps: usize,
    device: Device,
    mut call: impl FnMut() -> tch_mix::Result<()>,
) -> Result<f64> {
    let sync = || {
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
    };
    // Warm-up: a few calls, and at least WARM_UP of them, so that clocks, caches and the
    // threads' spinning have settled before the first timed call (200 calls of a few
    // microseconds would otherwise be timed in the first millisecond of activity).
    let start = Instant::now();
    let mut calls = 0;
    while calls < reps.clamp(2, 5) || start.elapsed() < WARM_UP {
        call()?;
        calls += 1;
    }
    sync();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        call()?;
        sync();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Peak resident memory (VmHWM) growth of one call in MiB, on Linux; the kernel's peak counter is
/// reset through /proc/self/clear_refs first. Run after the timings: it changes the allocator.
#[allow(unsafe_code)] // glibc's allocator settings, for the measurement only
fn peak_extra_mib(call: impl FnOnce() -> tch_mix::Result<()>) -> Result<Option<f64>> {
    let read = |field: &str| -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    // Every allocation of 64 KiB or more gets its own mapping, returned at free: growth of the
    // peak resident set is then what the call allocated, not what the allocator had cached.
    // SAFETY: mallopt only tunes glibc's allocator; it is called before the measured call.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 10);
        libc::malloc_trim(0);
    }
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        call()?;
        return Ok(None);
    }
    let before = read("VmRSS:");
    call()?;
    Ok(before.zip(read("VmHWM:")).map(|(before, peak)| peak - before))
}

pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    if let Some(threads) = options.threads {
        tch::set_num_threads(threads);
    }
    let kind: Kind =
        kind_from_name(&options.dtype).with_context(|| format!("--dtype {}", options.dtype))?;
    let mut vs = nn::VarStore::new(options.device);
    vs.set_kind(kind);
    let mixer = build(&options, &vs.root())?;
    if let Some(weights) = &options.weights {
        let state = StateDict::from_file(weights)
            .with_context(|| format!("--weights {}", weights.display()))?;
        load_var_store(&vs, &state).with_context(|| format!("--weights {}", weights.display()))?;
    }
    let shape = [options.batch, options.n_features, options.mod_dim];
    let inp = match &options.input {
        Some(path) => read_tensor(path, "input", kind, options.device)?,
        None => Tensor::f_randn(shape, (kind, options.device))?,
    };
    if inp.size() != shape {
        bail!("--input: shape {:?}, expected {shape:?}", inp.size());
    }
    let reps = options.reps;
    let _guard = tch::no_grad_guard();
    // Checked once before timing, so that nothing times a wrong result.
    let mut errors = String::new();
    if let Some(path) = &options.expect {
        let forward = mixer.f_forward_t(&inp, None, false)?;
        let importance = mixer.f_importance(&inp, None)?;
        let forward_err = relative_error(
            "forward",
            &forward,
            &read_tensor(path, "forward", kind, options.device)?,
        )?;
        let importance_err = relative_error(
            "importance",
            &importance,
            &read_tensor(path, "importance", kind, options.device)?,
        )?;
        if forward_err > TOLERANCE || importance_err > TOLERANCE {
            bail!(
                "--expect {}: forward {forward_err:.2e}, importance {importance_err:.2e} from swak's (tolerance {TOLERANCE:.0e})",
                path.display()
            );
        }
        errors = format!(" forward_err={forward_err:.1e} importance_err={importance_err:.1e}");
    }
    let forward =
        median_ms(reps, options.device, || mixer.f_forward_t(&inp, None, false).map(drop))?;
    let importance = median_ms(reps, options.device, || mixer.f_importance(&inp, None).map(drop))?;
    let both = median_ms(reps, options.device, || {
        mixer.f_forward_and_importance_t(&inp, None, false).map(drop)
    })?;
    // Into buffers allocated once, as a service's hot loop would hold them.
    let mut into = String::new();
    if options.into {
        let (mut out, mut imp) = mixer.f_forward_and_importance_t(&inp, None, false)?;
        let forward =
            median_ms(reps, options.device, || mixer.f_forward_into(&mut out, &inp, None))?;
        let both = median_ms(reps, options.device, || {
            mixer.f_forward_and_importance_into(&mut out, &mut imp, &inp, None)
        })?;
        into = format!(" forward_into_ms={forward:.4} both_into_ms={both:.4}");
    }
    let input_mib = inp.numel() as f64 * kind.elt_size_in_bytes() as f64 / (1 << 20) as f64;
    let extra = match options.device {
        Device::Cpu => peak_extra_mib(|| mixer.f_forward_t(&inp, None, false).map(drop))?,
        _ => None,
    };
    println!(
        "tch-mix {} mod_dim={} n_features={} n_heads={} input {:?} {} on {:?}, {} threads, median of {reps}",
        options.mixer,
        options.mod_dim,
        options.n_features,
        options.n_heads,
        shape,
        options.dtype,
        options.device,
        tch::get_num_threads()
    );
    let memory = extra.map_or(String::new(), |mib| {
        format!(" input_mib={input_mib:.1} forward_peak_extra_mib={mib:.1}")
    });
    let device = match options.device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(index) => format!("cuda:{index}"),
        other => format!("{other:?}"),
    };
    println!(
        "mixer={} batch={} dtype={} device={device} forward_ms={forward:.4} importance_ms={importance:.4} both_ms={both:.4}{into}{memory}{errors}",
        options.mixer, options.batch, options.dtype
    );
    Ok(())
}
