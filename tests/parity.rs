//! Parity with swak 1.2.0: every committed fixture (written from the real swak by the Python
//! package in `python/`: the grid, the NaN/Inf set and the trained-scale set) must pass
//! `Fixture::check` on the CPU, and on CUDA where a GPU is present; and the check must fail on
//! the mistakes an implementation could make (a swapped head, a dropped bias, a mask off by one
//! feature, a weight off by 1e-4), injected into trained-scale fixtures.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use tch::{Device, Tensor};
use tch_mix::fixture::{Fixture, Rule, TRUTH_MULTIPLE};

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
fn a_perturbed_reference_fails_the_elementwise_rule() {
    // The elementwise rule must be able to fail: change swak's output by more than the tolerance.
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

#[test]
fn version_1_fixtures_are_judged_elementwise() {
    for name in ["fixture-v1-cross-float32", "fixture-v1-instance-float32"] {
        let fixture = Fixture::read(common::data(&format!("{name}.safetensors"))).unwrap();
        assert_eq!(fixture.meta("format").unwrap(), "tch-mix-fixture/1");
        let report = fixture.check(Device::Cpu).unwrap();
        assert!(matches!(report.rule, Rule::Elementwise(_)), "{name}: {:?}", report.rule);
        assert!(report.passed(), "{name}: {:?}", report.comparisons);
    }
}

#[test]
fn fixtures_below_float64_carry_the_truth_and_are_judged_by_it() {
    let mut judged = 0;
    for file in fixture_files() {
        let fixture = Fixture::read(&file).unwrap();
        let float64 = fixture.meta("dtype").unwrap() == "float64";
        assert_eq!(fixture.has_truth().unwrap(), !float64, "{}", file.display());
        if !float64 {
            let report = fixture.check(Device::Cpu).unwrap();
            assert!(matches!(report.rule, Rule::Truth { .. }));
            for comparison in &report.comparisons {
                let truth = comparison.truth.expect("every comparison has the truth's errors");
                assert!(truth.allowed > 0.0 || truth.tch_mix == 0.0, "{comparison}");
            }
            judged += 1;
        }
    }
    assert!(judged >= 100, "only {judged} fixtures with the truth");
}

/// The trained-scale fixtures of one mixer (`scale-<mixer>-...`), at least one.
fn scale_fixtures(mixer: &str) -> Vec<Fixture> {
    let prefix = format!("scale-{mixer}-");
    let found: Vec<Fixture> = fixture_files()
        .iter()
        .filter(|f| f.file_name().unwrap().to_string_lossy().starts_with(&prefix))
        .map(|f| Fixture::read(f).unwrap())
        .collect();
    assert!(!found.is_empty(), "no trained-scale fixture of {mixer}");
    found
}

/// Checks `fixture` after `mistake` changed it: must fail, on more than rounding.
fn assert_mistake_fails(mut fixture: Fixture, what: &str, mistake: impl Fn(&mut Fixture)) {
    let clean = fixture.check(Device::Cpu).unwrap();
    assert!(clean.passed(), "{}: {:?}", fixture.path.display(), clean.comparisons);
    mistake(&mut fixture);
    let report = fixture.check(Device::Cpu).unwrap();
    let failed: Vec<String> =
        report.comparisons.iter().filter(|c| !c.passed).map(|c| c.to_string()).collect();
    assert!(
        !failed.is_empty(),
        "{what} in {} passed: {:?}",
        fixture.path.display(),
        report.comparisons
    );
    assert!(
        failed.iter().any(|f| f.starts_with("output")),
        "{what} in {}: the output did not fail ({failed:?})",
        fixture.path.display()
    );
    let output = report.comparisons.iter().find(|c| c.name == "output").unwrap();
    println!(
        "{what} in {}: FAIL as it must ({} comparisons; the output at {:.0}x its bound)",
        fixture.path.file_name().unwrap().to_string_lossy(),
        failed.len(),
        output.used
    );
}

fn state(fixture: &Fixture, key: &str) -> Tensor {
    fixture.tensor(&format!("state.{key}")).unwrap().copy()
}

#[test]
fn swapped_heads_fail() {
    for mixer in ["cross", "self"] {
        for fixture in scale_fixtures(mixer) {
            let mod_dim: i64 = fixture.meta("mod_dim").unwrap().parse().unwrap();
            let heads: i64 = fixture.meta("n_heads").unwrap().parse().unwrap();
            assert!(heads >= 2, "{}: a head swap needs 2 heads", fixture.path.display());
            let head = mod_dim / heads;
            assert_mistake_fails(fixture, "keys of heads 0 and 1 swapped", |f| {
                let weight = state(f, "attention.in_proj_weight");
                // The key rows are mod_dim..2 mod_dim; head h has rows h*head..(h+1)*head.
                let first = weight.narrow(0, mod_dim, head).copy();
                let second = weight.narrow(0, mod_dim + head, head).copy();
                weight.narrow(0, mod_dim, head).copy_(&second);
                weight.narrow(0, mod_dim + head, head).copy_(&first);
                f.replace_tensor("state.attention.in_proj_weight", weight);
            });
        }
    }
}

#[test]
fn dropped_biases_fail() {
    let biases = [
        ("instance", "project.bias"),
        ("cross", "attention.in_proj_bias"),
        ("cross", "attention.out_proj.bias"),
        ("self", "attention.in_proj_bias"),
        ("self", "attention.out_proj.bias"),
    ];
    for (mixer, key) in biases {
        for fixture in scale_fixtures(mixer) {
            assert_mistake_fails(fixture, &format!("{key} dropped"), |f| {
                let zeros = state(f, key).zeros_like();
                f.replace_tensor(&format!("state.{key}"), zeros);
            });
        }
    }
}

#[test]
fn a_mask_off_by_one_feature_fails() {
    // The weight mixers ignore the mask, as swak's do: the attention mixers are the ones to test.
    let mut masked = 0;
    for mixer in ["cross", "self"] {
        for fixture in scale_fixtures(mixer) {
            let Ok(mask) = fixture.tensor("mask").map(Tensor::copy) else { continue };
            masked += 1;
            assert_mistake_fails(fixture, "the mask rolled by one feature", |f| {
                f.replace_tensor("mask", mask.roll([1], [-1]));
            });
        }
    }
    assert!(masked >= 4, "only {masked} trained-scale fixtures with a mask");
}

#[test]
fn a_weight_off_by_1e_4_fails() {
    // Not the global mixer's coefficients: at 10x scale their softmax is saturated, and 1e-4 of
    // them moves the output by less than rounding (the rolled coefficients below do fail).
    let weights = [
        ("instance", "project.weight"),
        ("cross", "attention.out_proj.weight"),
        ("self", "attention.in_proj_weight"),
    ];
    for (mixer, key) in weights {
        for fixture in scale_fixtures(mixer) {
            assert_mistake_fails(fixture, &format!("{key} x (1 + 1e-4)"), |f| {
                let scaled = state(f, key) * (1.0 + 1e-4);
                f.replace_tensor(&format!("state.{key}"), scaled);
            });
        }
    }
}

#[test]
fn permuted_feature_weights_fail() {
    for fixture in scale_fixtures("global") {
        assert_mistake_fails(fixture, "coeffs rolled by one feature", |f| {
            let rolled = state(f, "coeffs").roll([1], [0]);
            f.replace_tensor("state.coeffs", rolled);
        });
    }
}

#[test]
fn ignored_values_are_left_out_and_a_misshaped_ignore_mask_is_an_error() {
    let file = fixture_files()
        .into_iter()
        .find(|f| f.to_string_lossy().contains("cross-float32-3d-f3"))
        .unwrap();
    let mut fixture = Fixture::read(&file).unwrap();
    let output = fixture.tensor("output").unwrap().copy();
    // swak's value replaced by garbage in the first instance, which `ignore` leaves out.
    let ignore = output.zeros_like().to_kind(tch::Kind::Bool);
    let _ = ignore.get(0).fill_(1);
    let _ = output.get(0).fill_(f64::NAN);
    fixture.replace_tensor("output", output);
    fixture.replace_tensor("ignore.output", ignore.shallow_clone());
    let report = fixture.check(Device::Cpu).unwrap();
    let row = report.comparisons.iter().find(|c| c.name == "output").unwrap();
    assert!(row.passed && row.ignored > 0, "{row:?}");
    fixture.replace_tensor("ignore.output", ignore.flatten(0, -1));
    let message = fixture.check(Device::Cpu).unwrap_err().to_string();
    assert!(message.contains("ignore.output") && message.contains("bool tensor"), "{message}");
}

#[test]
fn nan_where_swak_has_a_number_fails_either_rule() {
    let file = fixture_files()
        .into_iter()
        .find(|f| f.to_string_lossy().contains("cross-float32-3d-f3"))
        .unwrap();
    let mut fixture = Fixture::read(&file).unwrap();
    let output = fixture.tensor("output").unwrap().copy();
    let _ = output.get(0).fill_(f64::NAN);
    fixture.replace_tensor("output", output);
    let report = fixture.check(Device::Cpu).unwrap();
    let row = report.comparisons.iter().find(|c| c.name == "output").unwrap();
    assert!(!row.passed && row.mismatched > 0, "{row:?}");
}

#[test]
fn swaks_error_on_neighbouring_problems_widens_the_bound_and_must_be_well_formed() {
    let mut fixture = scale_fixtures("instance").remove(0);
    let stored = fixture.tensor("swak_error.output").unwrap().double_value(&[]);
    let output = |fixture: &Fixture| {
        let report = fixture.check(Device::Cpu).unwrap();
        report.comparisons.into_iter().find(|c| c.name == "output").unwrap()
    };
    let row = output(&fixture);
    let errors = row.truth.unwrap();
    assert_eq!(errors.swak_neighbours, Some(stored), "{row}");
    assert!(row.to_string().contains("on neighbours"), "{row}");
    fixture.replace_tensor("swak_error.output", Tensor::from(0.5f64));
    let widened = output(&fixture).truth.unwrap();
    assert!(widened.allowed >= TRUTH_MULTIPLE * 0.5, "{widened:?}");
    for bad in [Tensor::from(-1.0f64), Tensor::from(f64::NAN), Tensor::from_slice(&[0.0f64, 0.0])] {
        fixture.replace_tensor("swak_error.output", bad);
        let message = fixture.check(Device::Cpu).unwrap_err().to_string();
        assert!(message.contains("swak_error.output"), "{message}");
    }
}
