//! The tch-mix demo: load the weights of small swak models trained in PyTorch
//! (`scripts/train_demo.py`), run a batch through each mixer in Rust, and show the output's shape,
//! each feature's importance as a bar chart, and the parity with swak's own output.
//!
//! Run with `scripts/demo` (or `cargo run --example demo` after `. "$(scripts/setup)"`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use tch::{nn, Device, Kind};
use tch_mix::fixture::Fixture;
use tch_mix::StateDict;

const MIXERS: [&str; 4] = ["global", "instance", "cross", "self"];

fn main() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo");
    println!("Synthetic data: 6 features of size 8; only features 1 and 4 carry the signal.\n");
    let mut all_passed = true;
    for name in MIXERS {
        all_passed &= demo(&dir, name)?;
    }
    anyhow::ensure!(all_passed, "some mixer did not reproduce swak's output");
    println!("All mixers reproduce swak's numbers.");
    Ok(())
}

/// Loads one trained mixer, runs the fixture's batch, prints the report; true if it matches swak.
fn demo(dir: &std::path::Path, name: &str) -> Result<bool> {
    // The reference: the batch and swak's output on it, with the mixer's hyper-parameters.
    let fixture = Fixture::read(dir.join(format!("{name}.fixture.safetensors")))?;
    let vs = nn::VarStore::new(Device::Cpu);
    let mixer = fixture.build(&(vs.root() / "mix"))?;
    // The weights as PyTorch saved them: torch.save(model.state_dict()), the mixer under `mix`.
    let weights = dir.join(format!("{name}.pt"));
    let state = StateDict::from_file(&weights)?;
    mixer
        .load_state(&state.sub("mix"))
        .with_context(|| format!("loading {}", weights.display()))?;

    let batch = fixture.tensor("input")?;
    let (mixed, importance) =
        tch::no_grad(|| mixer.f_forward_and_importance_t(batch, None, false))?;
    println!(
        "== {name} ({:?} -> {:?}), weights from {}",
        batch.size(),
        mixed.size(),
        weights.display()
    );
    let mean = importance.mean_dim(0, false, Kind::Double);
    let shares = Vec::<f64>::try_from(&mean)?;
    for (feature, share) in shares.iter().enumerate() {
        let bar = "#".repeat((share * 50.0).round() as usize);
        let marker = if [1, 4].contains(&feature) { " <- informative" } else { "" };
        println!("  feature {feature} {share:>6.3} {bar}{marker}");
    }
    // Judged as `tch-mix check` judges: the distance to swak's float64 truth against swak's own.
    let output = fixture.judge("output", "output", &mixed)?;
    let weights_cmp = fixture.judge("importance", "importance", &importance)?;
    let passed = output.passed && weights_cmp.passed;
    println!(
        "  parity with swak: {output}\n                    {weights_cmp} -> {}\n",
        if passed { "PASS" } else { "FAIL" }
    );
    Ok(passed)
}
