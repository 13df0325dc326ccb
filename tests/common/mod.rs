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

/// The first CUDA device, or `None` with a note on stderr saying why the test is skipped.
pub fn cuda_or_skip(test: &str) -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("SKIPPED {test}: no CUDA device on this machine");
        None
    }
}
