//! The Rust job of "Parity in your CI": check the fixtures that
//! `examples/ci_parity/train_and_export.py` exported from a trained swak model, and that the
//! service's own loading path (the saved weights file, strictly) gives the fixture's numbers.
//!
//! ```text
//! python examples/ci_parity/train_and_export.py --out DIR   # the Python job
//! cargo run --example ci_parity -- DIR                      # the Rust job; exits non-zero on FAIL
//! ```

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use tch::{nn, Device};
use tch_mix::fixture::Fixture;
use tch_mix::StateDict;

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: ci_parity DIR")?);
    let device = Device::cuda_if_available();
    let mut failed = 0;
    for name in ["global", "instance", "cross", "self"] {
        // 1. The fixture alone: swak's weights, input and mask, every result and gradient,
        //    judged against swak's float64 truth.
        let fixture = Fixture::read(dir.join(format!("{name}.fixture.safetensors")))?;
        let report = fixture.check(device)?;
        let worst = report.worst().context("nothing compared")?;
        println!("{name}: {} -> {}", worst, if report.passed() { "PASS" } else { "FAIL" });
        failed += usize::from(!report.passed());

        // 2. The service's path: the mixer built from the metadata saved with the weights and
        //    loaded strictly from the weights file, on the fixture's batch.
        let state = StateDict::from_file(dir.join(format!("{name}.safetensors")))?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(fixture.kind()?);
        let spec = state.spec("mix")?.context("the weights file carries no mixer metadata")?;
        let mixer = spec.build(&vs.root())?;
        mixer.load_state(&state.sub("mix"))?;
        let input = fixture.tensor("input")?.to_device(device);
        let mask = fixture.tensor("mask")?.to_device(device);
        let output = tch::no_grad(|| mixer.f_forward_t(&input, Some(&mask), false))?;
        let served = fixture.judge("served output", "output", &output)?;
        println!("{name}: {served} -> {}", if served.passed { "PASS" } else { "FAIL" });
        failed += usize::from(!served.passed);
    }
    ensure!(failed == 0, "{failed} checks failed");
    println!("The Rust service gives the trained swak model's numbers.");
    Ok(())
}
