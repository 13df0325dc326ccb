//! `tch-mix`: parity checks of swak fixtures, weight-file conversion and benchmarks, on top of
//! the tch-mix library.
//!
//! ```text
//! tch-mix check [--device cpu|cuda[:N]] [--out DIR] FIXTURE_OR_DIR...
//! tch-mix convert IN OUT [--key K] [--prefix P] [--dtype T]
//! tch-mix bench --mixer M --mod-dim D --n-features F [--n-heads H] --batch B --dtype T
//!               [--device cpu|cuda[:N]] [--reps R] [--threads N] [--into]
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use tch::Device;
use tch_mix::fixture::{kind_from_name, Fixture, Rule};
use tch_mix::StateDict;

mod bench;

const USAGE: &str = "usage:
  tch-mix check [--device cpu|cuda[:N]] [--out DIR] FIXTURE_OR_DIR...
      Checks tch-mix against fixtures written by swak (tch-mix-fixture/2 or /1); a directory
      stands for the *.safetensors files in it. A fixture with swak's float64 truth is judged by
      tch-mix's error from that truth against swak's own; one without (float64, version 1)
      elementwise against swak's values. Each row names the rule and the comparison closest to
      its bound. Exits 0 only if every fixture passes. --out DIR writes what tch-mix computed to
      DIR/<fixture file name>.
  tch-mix convert IN OUT [--key K] [--prefix P] [--dtype float32|float64|bfloat16|float16]
      Reads any weight file tch-mix reads (safetensors; a torch.save state dict, or the model of
      a checkpoint such as swak's Checkpoint) and writes OUT, safetensors or torch.save's format
      by its extension (.safetensors, .pt, .pth), with the metadata the file carries. --key takes
      another entry of a checkpoint (a dotted path: model, optimizer.state.0); --prefix keeps the
      keys of one sub-module, the prefix stripped (mix.coeffs -> coeffs); --dtype converts the
      floating-point tensors. OUT is written atomically: on any error there is no OUT.
  tch-mix bench --mixer global|instance|cross|self --mod-dim D --n-features F [--n-heads H]
                --batch B --dtype float32|float64|bfloat16|float16 [--device cpu|cuda[:N]]
                [--reps R] [--threads N] [--weights W --input X --expect E] [--into]
      Times forward, importance and both in one call (eval, no grad) on a (B, F, D) input:
      the median of R calls after warm-up; with --into also forward and both into buffers
      held across calls (f_forward_into, f_forward_and_importance_into). The last line is
      machine-readable. With --weights, --input and --expect (files that
      scripts/export_peers.py writes), it runs swak's weights on swak's batch and checks
      forward and importance against swak's before timing.";

#[allow(unsafe_code)] // the signal disposition, set once at start-up
fn main() -> ExitCode {
    // Die quietly like other Unix tools when the reader of our output goes away (`| head`).
    // SAFETY: restores the default action of SIGPIPE before any thread or output exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("check") => check(&args[1..]),
        Some("convert") => convert(&args[1..]).map(|()| true),
        Some("bench") => bench::run(&args[1..]).map(|()| true),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(true)
        }
        _ => Err(anyhow!("{USAGE}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("tch-mix: {}", describe(&err));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes, `context: error: cause`, leaving out a cause whose first line the
/// text already holds (tch-mix's errors carry their file system or libtorch cause's message; a
/// libtorch cause's further lines are its C++ stack frames).
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        let first = cause.lines().next().unwrap_or_default();
        if text.is_empty() {
            text = cause;
        } else if !text.contains(first) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

/// Parses `cpu`, `cuda` or `cuda:N`, refusing CUDA where none is available.
pub(crate) fn parse_device(text: &str) -> Result<Device> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => bail!("--device: expected cpu, cuda or cuda:N, got {text:?}"),
        },
    };
    if let Device::Cuda(index) = device {
        let count = tch::Cuda::device_count();
        if index as i64 >= count {
            bail!("--device {text}: this machine has {count} CUDA device(s)");
        }
    }
    Ok(device)
}

/// Expands directories into the `*.safetensors` files they hold, sorted.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).with_context(|| format!("{}", path.display()))?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn check(args: &[String]) -> Result<bool> {
    let mut device = Device::Cpu;
    let mut out: Option<PathBuf> = None;
    let mut paths = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--device" => device = parse_device(args.next().context("--device needs a value")?)?,
            "--out" => out = Some(PathBuf::from(args.next().context("--out needs a value")?)),
            flag if flag.starts_with("--") => bail!("unknown option {flag}\n{USAGE}"),
            path => paths.push(PathBuf::from(path)),
        }
    }
    let files = expand(&paths)?;
    if files.is_empty() {
        bail!("no fixture given\n{USAGE}");
    }
    if let Some(out) = &out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let name = file
            .file_name()
            .map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into());
        match check_one(file, device, out.as_deref()) {
            Ok(row) => {
                println!("{name:<56} {row}");
                if row.ends_with("PASS") {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
            Err(err) => {
                println!("{name:<64} ERROR {}", describe(&err));
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(failed == 0)
}

/// Checks one fixture and returns its table row.
fn check_one(file: &Path, device: Device, out: Option<&Path>) -> Result<String> {
    let fixture = Fixture::read(file)?;
    let report = fixture.check(device)?;
    if let (Some(out), Some(name)) = (out, file.file_name()) {
        report.write(&out.join(name))?;
    }
    let worst = report.worst().context("nothing compared")?;
    let rule = match report.rule {
        Rule::Truth { .. } => "truth",
        Rule::Elementwise(_) => "elementwise",
    };
    let ignored: usize = report.comparisons.iter().map(|c| c.ignored).sum();
    let mut row = format!("{:<8} {:<8} {rule:<11} worst {worst}", report.mixer, report.dtype);
    if ignored > worst.ignored {
        row += &format!("; {ignored} values left out in all (order of sums)");
    }
    if report.passed() {
        row += "  PASS";
    } else {
        for failed in report.comparisons.iter().filter(|c| !c.passed) {
            row += &format!("\n    FAIL {failed}");
        }
        row += "\n    FAIL";
    }
    Ok(row)
}

/// `tch-mix convert IN OUT [--key K] [--prefix P] [--dtype T]`.
fn convert(args: &[String]) -> Result<()> {
    let (mut key, mut prefix, mut kind) = (None, None, None);
    let mut paths = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--key" => key = Some(value()?.clone()),
            "--prefix" => prefix = Some(value()?.clone()),
            "--dtype" => {
                let name = value()?;
                let parsed = kind_from_name(name).with_context(|| {
                    format!("--dtype: expected float32, float64, bfloat16 or float16, got {name:?}")
                })?;
                kind = Some(parsed);
            }
            flag if flag.starts_with("--") => bail!("unknown option {flag}\n{USAGE}"),
            path => paths.push(PathBuf::from(path)),
        }
    }
    let [input, output] = &paths[..] else {
        bail!("convert takes two paths, IN and OUT, got {}\n{USAGE}", paths.len());
    };
    let mut state = match &key {
        Some(key) => StateDict::from_file_key(input, key)?,
        None => StateDict::from_file(input)?,
    };
    if let Some(prefix) = &prefix {
        let sub = state.sub(prefix);
        if sub.is_empty() && !state.is_empty() {
            let mut heads: Vec<&str> =
                state.keys().map(|k| k.split('.').next().unwrap_or(k)).collect();
            heads.dedup();
            bail!(
                "--prefix {prefix:?}: no key of {} begins with \"{prefix}.\" (the keys begin with {})",
                input.display(),
                heads.iter().take(20).map(|h| format!("{h:?}")).collect::<Vec<_>>().join(", ")
            );
        }
        state = sub;
    }
    if let Some(kind) = kind {
        state = state.to_float_kind(kind)?;
    }
    state.save(output)?;
    let bytes: usize = state.iter().map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum();
    let mixers: Vec<String> = state
        .metadata()
        .iter()
        .filter_map(|(key, class)| {
            let at = key.strip_prefix("tch_mix")?.strip_suffix("mixer")?.trim_matches('.');
            Some(if at.is_empty() { class.clone() } else { format!("{class} at {at}") })
        })
        .collect();
    let described = if mixers.is_empty() {
        "no mixer metadata".to_string()
    } else {
        format!("metadata of {}", mixers.join(", "))
    };
    println!(
        "{} -> {}: {} tensors, {bytes} bytes, {described}",
        input.display(),
        output.display(),
        state.len()
    );
    Ok(())
}
