//! Parity fixtures (`tch-mix-fixture/1`) and their check, as used by `tch-mix check` and the tests.
//!
//! A fixture is one `.safetensors` file written by `scripts/export_fixture.py` from a real swak
//! mixer. Its `__metadata__` (all strings) describes the mixer: `format`, `mixer` (`global`,
//! `instance`, `cross`, `self`), `mod_dim`, `n_features`, `n_heads`, `bias`, `dropout`, `skip`,
//! `keep_dim`, `dtype`. Its tensors are `state.<key>` for every `state_dict()` entry, `input`, an
//! optional `mask`, `output` (eval forward), `importance`, and an optional gradient block:
//! `cotangent`, `grad.input` and `grad.state.<key>`, the gradients of `(output * cotangent).sum()`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::{self, Sniffed, StateDict};
use crate::error::{MixError, Result};
use crate::{Mixer, Spec};

/// The value of the `format` metadata entry this version reads and writes.
pub const FORMAT: &str = "tch-mix-fixture/1";

/// Absolute and relative tolerance: `|actual - expected| <= atol + rtol * |expected|`, elementwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

/// The tolerance tch-mix promises against swak for a dtype (the README's table).
pub fn tolerance(kind: Kind) -> Tolerance {
    match kind {
        Kind::Double => Tolerance { atol: 1e-12, rtol: 1e-10 },
        Kind::Float => Tolerance { atol: 1e-5, rtol: 1e-5 },
        Kind::Half => Tolerance { atol: 1e-3, rtol: 1e-3 },
        _ => Tolerance { atol: 1e-2, rtol: 1.6e-2 },
    }
}

/// The dtype names of the fixture format.
pub fn kind_from_name(name: &str) -> Option<Kind> {
    match name {
        "float64" => Some(Kind::Double),
        "float32" => Some(Kind::Float),
        "float16" => Some(Kind::Half),
        "bfloat16" => Some(Kind::BFloat16),
        _ => None,
    }
}

/// A fixture file, read.
#[derive(Debug)]
pub struct Fixture {
    /// Where it was read from.
    pub path: PathBuf,
    /// The `__metadata__` entries.
    pub metadata: HashMap<String, String>,
    tensors: HashMap<String, Tensor>,
}

/// One compared tensor of a check.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// `output`, `importance`, `grad.input` or `grad.state.<key>`.
    pub name: String,
    /// Largest absolute difference (infinite if the shapes differ).
    pub max_abs: f64,
    /// Largest difference relative to the reference's magnitude, over non-zero reference values.
    pub max_rel: f64,
    /// Whether every element lies within the tolerance.
    pub passed: bool,
}

/// The result of checking one fixture.
#[derive(Debug)]
pub struct Report {
    /// The mixer (`global`, ...).
    pub mixer: String,
    /// The dtype name (`float32`, ...).
    pub dtype: String,
    /// The tolerance applied.
    pub tolerance: Tolerance,
    /// Every compared tensor.
    pub comparisons: Vec<Comparison>,
    /// What tch-mix computed, under the fixture's names (`output`, `importance`, `grad.*`).
    pub computed: Vec<(String, Tensor)>,
}

impl Report {
    /// Whether every comparison passed.
    pub fn passed(&self) -> bool {
        self.comparisons.iter().all(|c| c.passed)
    }

    /// The comparison with the largest absolute error.
    pub fn worst(&self) -> Option<&Comparison> {
        self.comparisons.iter().max_by(|a, b| a.max_abs.total_cmp(&b.max_abs))
    }

    /// Writes [`Report::computed`] to a safetensors file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(self.computed.len());
        for (name, tensor) in &self.computed {
            tensors.push((name.as_str(), tensor.f_to_device(Device::Cpu)?.f_contiguous()?));
        }
        Tensor::write_safetensors(&tensors, path).map_err(|e| MixError::Format {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }
}

impl Fixture {
    /// Reads a fixture and checks its `format`.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|source| MixError::Io { path: path.display().to_string(), source })?;
        let not_a_fixture = |what: &str| MixError::Format {
            path: path.display().to_string(),
            reason: format!(
                "{what}, not a {FORMAT} fixture (a safetensors file written by \
                 scripts/export_fixture.py; `--weights` there takes a torch.save file)"
            ),
        };
        match checkpoint::sniff(bytes.get(..4).unwrap_or(&bytes)) {
            Sniffed::TorchZip => return Err(not_a_fixture("a torch.save zip archive (weights)")),
            Sniffed::TorchLegacy => return Err(not_a_fixture("a legacy torch.save file")),
            Sniffed::Other => {}
        }
        let (tensors, metadata) = checkpoint::read_safetensors(&bytes, path)?;
        let fixture =
            Self { path: path.to_path_buf(), metadata, tensors: tensors.into_iter().collect() };
        let format = fixture.meta("format")?;
        if format != FORMAT {
            return Err(fixture.error(format!("format {format:?}, expected {FORMAT:?}")));
        }
        Ok(fixture)
    }

    fn error(&self, reason: String) -> MixError {
        MixError::Format { path: self.path.display().to_string(), reason }
    }

    /// A metadata entry, which must be present.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.error(format!("metadata {key:?} is missing")))
    }

    fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let text = self.meta(key)?;
        text.parse()
            .map_err(|_| self.error(format!("metadata {key:?} = {text:?} is not a valid value")))
    }

    /// A tensor, which must be present.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| self.error(format!("tensor {name:?} is missing")))
    }

    /// The mixer's weights (`state.<key>` with the prefix stripped).
    pub fn state(&self) -> StateDict {
        let mut entries: Vec<_> = self
            .tensors
            .iter()
            .filter_map(|(name, t)| {
                Some((name.strip_prefix("state.")?.to_string(), t.shallow_clone()))
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        StateDict::new(entries)
    }

    /// The dtype the mixer was exported in.
    pub fn kind(&self) -> Result<Kind> {
        let name = self.meta("dtype")?;
        kind_from_name(name).ok_or_else(|| self.error(format!("unknown dtype {name:?}")))
    }

    /// The `state_dict` keys and shapes of the mixer the metadata describes, computed from the
    /// metadata alone (checked arithmetic), without building it.
    pub fn expected_state(&self) -> Result<Vec<(String, Vec<i64>)>> {
        let mixer = self.meta("mixer")?;
        let size = |key: &str| -> Result<i64> {
            let n: i64 = self.parse(key)?;
            if n < 0 {
                return Err(self.error(format!("metadata {key:?} = {n} is negative")));
            }
            Ok(n)
        };
        let product = |what: &str, a: i64, b: i64| {
            a.checked_mul(b)
                .ok_or_else(|| self.error(format!("metadata: {what} = {a} x {b} overflows i64")))
        };
        let mod_dim = size("mod_dim")?;
        let state = match mixer {
            "global" => vec![("coeffs", vec![size("n_features")?])],
            "instance" => {
                let n_features = size("n_features")?;
                let inputs = product("n_features x mod_dim", n_features, mod_dim)?;
                let mut state = vec![("project.weight", vec![n_features, inputs])];
                if self.parse("bias")? {
                    state.push(("project.bias", vec![n_features]));
                }
                state
            }
            "cross" | "self" => {
                let three = product("3 x mod_dim", 3, mod_dim)?;
                let mut state = vec![
                    ("attention.in_proj_weight", vec![three, mod_dim]),
                    ("attention.out_proj.weight", vec![mod_dim, mod_dim]),
                ];
                if self.parse("bias")? {
                    state.push(("attention.in_proj_bias", vec![three]));
                    state.push(("attention.out_proj.bias", vec![mod_dim]));
                }
                state
            }
            other => return Err(self.error(format!("unknown mixer {other:?}"))),
        };
        Ok(state.into_iter().map(|(key, shape)| (key.to_string(), shape)).collect())
    }

    /// Checks the fixture's `state.*` tensors against [`Fixture::expected_state`]: the same keys,
    /// the same shapes. After this, building the mixer allocates no more than the fixture's own
    /// weights, whatever its metadata says.
    fn check_state(&self) -> Result<()> {
        let expected = self.expected_state()?;
        let state = self.state();
        let mut problems = Vec::new();
        for (key, shape) in &expected {
            match state.get(key) {
                None => problems.push(format!("state.{key} is missing")),
                Some(tensor) if tensor.size() != *shape => problems.push(format!(
                    "state.{key} has shape {:?}, the metadata says {shape:?}",
                    tensor.size()
                )),
                Some(_) => {}
            }
        }
        for key in state.keys().filter(|key| !expected.iter().any(|(k, _)| k == key)) {
            problems.push(format!("state.{key} is not a weight of that mixer"));
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(self.error(format!(
            "the weights do not fit the mixer its metadata describes ({}, mod_dim {}, \
             n_features {}): {}",
            self.meta("mixer")?,
            self.meta("mod_dim")?,
            self.metadata.get("n_features").map_or("-", String::as_str),
            problems.join("; ")
        )))
    }

    /// Builds the described mixer on `path` (whose VarStore sets device and dtype), not yet
    /// loaded. The fixture's weights are checked against the metadata first, so a fixture cannot
    /// make this allocate more than its own weights.
    pub fn build(&self, path: &nn::Path) -> Result<Box<dyn Mixer>> {
        self.check_state()?;
        let spec = Spec::from_metadata(|key| self.metadata.get(key).cloned())
            .map_err(|e| self.error(e.to_string()))?;
        spec.build(path)
    }

    /// Builds the mixer on `device`, loads `state.*` strictly, runs forward (eval) and importance
    /// (and the gradient block when present), and compares everything with the fixture.
    pub fn check(&self, device: Device) -> Result<Report> {
        let kind = self.kind()?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let mixer = self.build(&vs.root())?;
        mixer.load_state(&self.state())?;
        let inp = self.tensor("input")?.f_to_device(device)?;
        let mask = match self.tensors.get("mask") {
            Some(mask) => Some(mask.f_to_device(device)?),
            None => None,
        };
        let mut computed = Vec::new();
        let importance = tch::no_grad(|| mixer.f_importance(&inp, mask.as_ref()))?;
        if let Some(cotangent) = self.tensors.get("cotangent") {
            let inp = inp.f_detach()?.f_set_requires_grad(true)?;
            let output = mixer.f_forward_t(&inp, mask.as_ref(), false)?;
            let loss = output.f_mul(&cotangent.f_to_device(device)?)?.f_sum(None::<Kind>)?;
            loss.f_backward()?;
            computed.push(("output".to_string(), output.f_detach()?));
            computed.push(("importance".to_string(), importance));
            computed.push(("grad.input".to_string(), gradient(&inp)?));
            for (key, variable) in mixer.variables() {
                computed.push((format!("grad.state.{key}"), gradient(&variable)?));
            }
        } else {
            let output = tch::no_grad(|| mixer.f_forward_t(&inp, mask.as_ref(), false))?;
            computed.push(("output".to_string(), output));
            computed.push(("importance".to_string(), importance));
        }
        let tolerance = tolerance(kind);
        let mut comparisons = Vec::with_capacity(computed.len());
        for (name, actual) in &computed {
            comparisons.push(compare(name, actual, self.tensor(name)?, tolerance)?);
        }
        // Inference (no autograd) may take other paths than training: compare it as well, and
        // the one call that returns both.
        let (output, both_importance) =
            tch::no_grad(|| mixer.f_forward_and_importance_t(&inp, mask.as_ref(), false))?;
        let expected = self.tensor("output")?;
        comparisons.push(compare("output (no grad)", &output, expected, tolerance)?);
        let expected = self.tensor("importance")?;
        comparisons.push(compare("importance (both)", &both_importance, expected, tolerance)?);
        Ok(Report {
            mixer: self.meta("mixer")?.to_string(),
            dtype: self.meta("dtype")?.to_string(),
            tolerance,
            comparisons,
            computed,
        })
    }
}

/// The gradient accumulated on `t`, zeros where `t` did not take part in the loss.
fn gradient(t: &Tensor) -> Result<Tensor> {
    let grad = t.grad();
    Ok(if grad.defined() { grad } else { t.f_zeros_like()? })
}

/// Compares `actual` with `expected` elementwise in f64 on the CPU. NaNs match NaNs.
pub fn compare(
    name: &str,
    actual: &Tensor,
    expected: &Tensor,
    tolerance: Tolerance,
) -> Result<Comparison> {
    if actual.size() != expected.size() {
        return Ok(Comparison {
            name: name.to_string(),
            max_abs: f64::INFINITY,
            max_rel: f64::INFINITY,
            passed: false,
        });
    }
    let to_f64 = |t: &Tensor| -> Result<Vec<f64>> {
        let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
        Ok(Vec::<f64>::try_from(&flat)?)
    };
    let (actual, expected) = (to_f64(actual)?, to_f64(expected)?);
    let (mut max_abs, mut max_rel, mut passed) = (0.0f64, 0.0f64, true);
    for (&a, &e) in actual.iter().zip(&expected) {
        if a.is_nan() || e.is_nan() {
            if a.is_nan() != e.is_nan() {
                passed = false;
                max_abs = f64::INFINITY;
            }
            continue;
        }
        let diff = if a == e { 0.0 } else { (a - e).abs() };
        max_abs = max_abs.max(diff);
        if e != 0.0 {
            max_rel = max_rel.max(diff / e.abs());
        }
        passed &= diff <= tolerance.atol + tolerance.rtol * e.abs();
    }
    Ok(Comparison { name: name.to_string(), max_abs, max_rel, passed })
}
