//! The `tch-mix` command line: `check` exit codes, error rows and `--out`; `bench`'s last line.

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
