//! The `tch-mix` command line: `check` exit codes, error rows and `--out`; `bench`'s last line and
//! its check of given weights and input against expected outputs; `convert`.

use std::path::PathBuf;
use std::process::Command;

fn tch_mix(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tch-mix")).args(args).output().unwrap();
    let code = output.status.code().unwrap_or(-1);
    (
        code,
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-mix-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_passes_and_writes_what_it_computed() {
    let out = scratch("out");
    let name = "cross-float64-3d-f3-h2-skip-squeeze-maskbool.safetensors";
    let (code, stdout, _) = tch_mix(&["check", "--out", out.to_str().unwrap(), &fixture(name)]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("PASS") && stdout.contains("1 passed, 0 failed"), "{stdout}");
    let written = tch::Tensor::read_safetensors(out.join(name)).unwrap();
    let mut names: Vec<String> = written.into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert!(names.contains(&"output".to_string()) && names.contains(&"importance".to_string()));
    assert!(names.contains(&"grad.input".to_string()));
    assert!(names.contains(&"grad.state.attention.in_proj_weight".to_string()), "{names:?}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn malformed_fixture_gets_an_error_row_and_a_failing_exit() {
    let dir = scratch("bad");
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"definitely not a fixture").unwrap();
    let good = fixture("global-float32-3d-f3-skip-squeeze-masknone.safetensors");
    let (code, stdout, _) = tch_mix(&["check", bad.to_str().unwrap(), &good]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("bad.safetensors") && stdout.contains("ERROR"), "{stdout}");
    assert!(stdout.contains("1 passed, 1 failed"), "{stdout}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_error_names_its_cause_once() {
    let missing = scratch("missing").join("gone.safetensors");
    let (code, stdout, _) = tch_mix(&["check", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    let row = stdout.lines().find(|l| l.contains("ERROR")).expect(&stdout);
    assert_eq!(row.matches("No such file or directory").count(), 1, "{row}");
    let (code, _, stderr) = tch_mix(&["convert", missing.to_str().unwrap(), "out.safetensors"]);
    assert_eq!(code, 2);
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}

#[test]
fn usage_errors_exit_with_2() {
    let (code, _, stderr) = tch_mix(&["check", "--device", "tpu", "x"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("expected cpu, cuda or cuda:N, got \"tpu\""), "{stderr}");
    let (code, _, stderr) = tch_mix(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("usage"), "{stderr}");
}

#[test]
fn bench_ends_with_a_machine_readable_line() {
    let args =
        ["bench", "--mixer", "self", "--mod-dim", "8", "--n-features", "3", "--n-heads", "2"];
    let (code, stdout, stderr) = tch_mix(&[&args[..], &["--batch", "4", "--reps", "3"]].concat());
    assert_eq!(code, 0, "{stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with("mixer=self batch=4 dtype=float32 device=cpu forward_ms="), "{last}");
    assert!(last.contains(" importance_ms=") && last.contains(" both_ms="), "{last}");
    assert!(!last.contains("_into_ms="), "{last}");
    let into = [&args[..], &["--batch", "4", "--reps", "3", "--into"]].concat();
    let (code, stdout, stderr) = tch_mix(&into);
    assert_eq!(code, 0, "{stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(last.contains(" forward_into_ms=") && last.contains(" both_into_ms="), "{last}");
    let (code, _, stderr) = tch_mix(&[
        "bench",
        "--mixer",
        "other",
        "--mod-dim",
        "8",
        "--n-features",
        "3",
        "--batch",
        "4",
    ]);
    assert_eq!(code, 2, "{stderr}");
}

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn convert_turns_a_swak_checkpoint_into_the_safetensors_a_service_ships() {
    let dir = scratch("convert");
    let out = dir.join("model.safetensors");
    let (code, stdout, stderr) =
        tch_mix(&["convert", &data("checkpoint-meta.pt"), out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("4 tensors") && stdout.contains("metadata of instance at mix"),
        "{stdout}"
    );
    let shipped = tch_mix::StateDict::from_file(&out).unwrap();
    let model = tch_mix::StateDict::from_file_key(data("checkpoint-meta.pt"), "model").unwrap();
    for (key, t) in model.iter() {
        assert!(t.equal(shipped.get(key).unwrap()), "{key}");
    }
    assert_eq!(shipped.metadata(), model.metadata());
    // One sub-module, its prefix stripped and its metadata with it, in bfloat16, as a .pt.
    let out = dir.join("mix.pt");
    let args = ["--prefix", "mix", "--dtype", "bfloat16"];
    let (code, _, stderr) = tch_mix(
        &[&["convert", &data("checkpoint-meta.pt"), out.to_str().unwrap()], &args[..]].concat(),
    );
    assert_eq!(code, 0, "{stderr}");
    let mix = tch_mix::StateDict::from_file(&out).unwrap();
    assert_eq!(mix.keys().collect::<Vec<_>>(), ["project.weight", "project.bias"]);
    assert_eq!(mix.get("project.weight").unwrap().kind(), tch::Kind::BFloat16);
    assert_eq!(mix.spec("").unwrap().unwrap().name(), "instance");
    // Another entry of the checkpoint.
    let out = dir.join("adam.pt");
    let args =
        ["convert", &data("checkpoint.pt"), out.to_str().unwrap(), "--key", "optimizer.state.0"];
    assert_eq!(tch_mix(&args).0, 0);
    let adam = tch_mix::StateDict::from_file(&out).unwrap();
    assert_eq!(adam.keys().collect::<Vec<_>>(), ["step", "exp_avg", "exp_avg_sq"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn convert_fails_clearly_and_leaves_no_output() {
    let dir = scratch("convert-fail");
    let out = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let cases: [(Vec<String>, &str); 7] = [
        (vec![data("checkpoint.pt"), out("a.bin")], "unknown extension"),
        (
            vec![data("checkpoint.pt"), out("a.pt"), "--key".into(), "modle".into()],
            "no entry \"modle\"",
        ),
        (vec![data("checkpoint.pt"), out("a.pt"), "--prefix".into(), "foo".into()], "no key of"),
        (vec![data("whole-module.pt"), out("a.pt")], "save its state_dict() instead"),
        (
            vec![data("checkpoint.pt"), out("a.pt"), "--dtype".into(), "int8".into()],
            "--dtype: expected",
        ),
        (vec![data("checkpoint.pt")], "convert takes two paths"),
        (vec![data("absent.pt"), out("a.pt")], "absent.pt"),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> =
            std::iter::once("convert").chain(args.iter().map(String::as_str)).collect();
        let (code, _, stderr) = tch_mix(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no output, no temporary file");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_checks_given_weights_and_input_before_timing() {
    // A GlobalWeightsMixer's forward by hand: softmax(coeffs)-weighted features plus their mean.
    let dir = scratch("expect");
    let coeffs = tch::Tensor::from_slice(&[0.5f32, -1.0, 2.0]);
    let input = tch::Tensor::randn([4, 3, 8], (tch::Kind::Float, tch::Device::Cpu));
    let weights = coeffs.softmax(-1, tch::Kind::Float);
    let forward = (&input * weights.view([1, 3, 1])).sum_dim_intlist(1, false, tch::Kind::Float)
        + input.mean_dim(1, false, tch::Kind::Float);
    let importance = weights.unsqueeze(0).expand([4, 3], false).contiguous();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    tch::Tensor::write_safetensors(&[("coeffs", &coeffs)], path("w.safetensors")).unwrap();
    tch::Tensor::write_safetensors(&[("input", &input)], path("in.safetensors")).unwrap();
    let expect = [("forward", &forward), ("importance", &importance)];
    tch::Tensor::write_safetensors(&expect, path("right.safetensors")).unwrap();
    let off = &forward + 1e-2;
    let expect = [("forward", &off), ("importance", &importance)];
    tch::Tensor::write_safetensors(&expect, path("wrong.safetensors")).unwrap();

    let bench = |expect: &str| {
        let args = ["bench", "--mixer", "global", "--mod-dim", "8", "--n-features", "3"];
        let (w, i, e) = (path("w.safetensors"), path("in.safetensors"), path(expect));
        let files = ["--weights", &w, "--input", &i, "--expect", &e];
        tch_mix(&[&args[..], &["--batch", "4", "--reps", "2"], &files].concat())
    };
    let (code, stdout, stderr) = bench("right.safetensors");
    assert_eq!(code, 0, "{stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(last.contains(" forward_err=") && last.contains(" importance_err="), "{last}");
    let (code, _, stderr) = bench("wrong.safetensors");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("from swak's (tolerance 1e-4)"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}
