//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod craft;

use tch::{Device, Kind, Tensor};

/// A file under `tests/data`.
pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// The folder of committed fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A `(shape)` tensor of ones in f32 on the CPU.
pub fn ones(shape: &[i64]) -> Tensor {
    Tensor::ones(shape, (Kind::Float, Device::Cpu))
}

/// Asserts two tensors have the same shape and agree to 1e-6.
pub fn assert_close(actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.size(), expected.size(), "shapes differ");
    let diff = (actual.to_kind(Kind::Double) - expected.to_kind(Kind::Double)).abs();
    let max = if diff.numel() == 0 { 0.0 } else { diff.max().double_value(&[]) };
    assert!(max <= 1e-6, "max abs difference {max}: {actual} vs {expected}");
}

/// The first CUDA device, for the tests marked `#[ignore]` that need one (run with
/// `--ignored` on a GPU machine, as `scripts/device_check` does); a failure without one, so
/// that a CUDA test never passes without having run.
pub fn cuda() -> Device {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA device and found none");
    Device::Cuda(0)
}
