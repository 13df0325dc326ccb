//! Parity with swak 1.2.0: every committed fixture (written by scripts/gen_fixtures.py from the
//! real swak) must pass `Fixture::check` on the CPU, and on CUDA where a GPU is present.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use tch::Device;
use tch_mix::fixture::Fixture;

fn fixture_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(common::fixtures())
        .expect("tests/fixtures exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

fn check_all(device: Device) {
    let mut failures = Vec::new();
    for file in fixture_files() {
        let fixture = Fixture::read(&file).unwrap();
        match fixture.check(device) {
            Ok(report) if report.passed() => {}
            Ok(report) => failures.push(format!("{}: {:?}", file.display(), report.comparisons)),
            Err(err) => failures.push(format!("{}: {err}", file.display())),
        }
    }
    assert!(failures.is_empty(), "{} fixtures failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn fixtures_cover_every_mixer_dtype_and_gradients() {
    let mut seen = BTreeSet::new();
    for file in fixture_files() {
        let fixture = Fixture::read(&file).unwrap();
        assert!(fixture.tensor("cotangent").is_ok(), "{} has no gradient block", file.display());
        seen.insert((
            fixture.meta("mixer").unwrap().to_string(),
            fixture.meta("dtype").unwrap().to_string(),
        ));
    }
    for mixer in ["global", "instance", "cross", "self"] {
        for dtype in ["float64", "float32", "bfloat16", "float16"] {
            assert!(
                seen.contains(&(mixer.to_string(), dtype.to_string())),
                "no {mixer} {dtype} fixture"
            );
        }
    }
}

#[test]
fn every_fixture_passes_on_cpu() {
    check_all(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device: scripts/device_check runs it with --ignored"]
fn every_fixture_passes_on_cuda() {
    let cuda = common::cuda();
    check_all(cuda);
}

#[test]
fn a_perturbed_reference_fails() {
    // The check must be able to fail: change swak's output by more than the tolerance.
    let file = fixture_files()
        .into_iter()
        .find(|f| f.to_string_lossy().contains("float32-3d-f3"))
        .unwrap();
    let fixture = Fixture::read(&file).unwrap();
    let report = fixture.check(Device::Cpu).unwrap();
    let output = fixture.tensor("output").unwrap();
    let shifted = output + 1e-3;
    let tolerance = tch_mix::fixture::tolerance(output.kind());
    let comparison =
        tch_mix::fixture::compare("output", &report.computed[0].1, &shifted, tolerance).unwrap();
    assert!(!comparison.passed);
    assert!((comparison.max_abs - 1e-3).abs() < 1e-6, "{comparison:?}");
}
