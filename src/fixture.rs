//! Parity fixtures (`tch-mix-fixture/2`, version 1 still read) and their check, as used by
//! `tch-mix check` and the tests.
//!
//! A fixture is one `.safetensors` file written by the Python package `tch-mix-tools`
//! (`tch_mix_tools.export_fixture`) from a real swak mixer. Its `__metadata__` (all strings)
//! describes the mixer: `format`, `mixer` (`global`, `instance`, `cross`, `self`), `mod_dim`,
//! `n_features`, `n_heads`, `bias`, `dropout`, `skip`, `keep_dim`, `dtype`, and `truth`
//! (`float64`) where it carries the truth. Its tensors are `state.<key>` for every `state_dict()`
//! entry, `input`, an optional `mask`, `output` (eval forward), `importance`, and an optional
//! gradient block: `cotangent`, `grad.input` and `grad.state.<key>`, the gradients of
//! `(output * cotangent).sum()`. Everything in it is computed by swak:
//!
//! - `truth.<name>` for each of those results: swak's result in float64, from the same weights,
//!   input, mask and cotangent, on the mixer copied to float64 (fixtures in float32, float16 and
//!   bfloat16). Where it is present, [`Fixture::check`] judges tch-mix by its distance to the
//!   truth against swak's own distance ([`Rule::Truth`]); elsewhere elementwise against swak's
//!   values ([`Rule::Elementwise`]).
//! - `swak_error.<name>` (a float64 scalar, optional, metadata `neighbours`): swak's largest
//!   error from the float64 truth over neighbouring problems (the same mixer and input with
//!   every finite non-zero number moved one unit in the last place, up or down at random). One
//!   computation's rounding error is a draw of luck: two large softmax scores rounded the same
//!   way cancel, and swak's error on the fixture alone can be a hundred times smaller than the
//!   rounding it is exposed to. The rule measures swak's error as the larger of the two.
//! - `ignore.<name>` (bool, the shape of `<name>`): values that depend on the order of
//!   floating-point sums (a softmax saturated or overflowed by a huge input), left out.
//!
//! ```no_run
//! # fn main() -> tch_mix::Result<()> {
//! use tch_mix::fixture::Fixture;
//! let report = Fixture::read("mix.safetensors")?.check(tch::Device::Cpu)?;
//! for comparison in &report.comparisons {
//!     println!("{comparison}"); // output: tch-mix 1.7e-4, swak 2.3e-4 from the float64 truth ...
//! }
//! assert!(report.passed());
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::{self, Sniffed, StateDict};
use crate::error::{MixError, Result};
use crate::{Mixer, Spec};

/// The value of the `format` metadata entry this version writes.
pub const FORMAT: &str = "tch-mix-fixture/2";

/// Every `format` this version reads: version 1 (no truth, no `ignore.*`) and [`FORMAT`].
pub const FORMATS: [&str; 2] = ["tch-mix-fixture/1", FORMAT];

/// The multiple of swak's own error (the larger of its error on the fixture and on its
/// neighbouring problems) that tch-mix's error from the float64 truth may reach.
///
/// Both are float roundings of one computation, so their errors are of one size: over the grid,
/// the NaN/Inf set, the trained-scale set and trained models, regenerated for many seeds,
/// tch-mix's error stays within about 2x swak's wherever swak's is above the floor (the
/// repository's `docs/parity.md` has the measurements). A real mistake (a swapped head, a
/// dropped bias, a mask off by one feature) puts the output a thousand to hundreds of thousands
/// of times over its bound; a weight off by `1e-4`, several times.
pub const TRUTH_MULTIPLE: f64 = 4.0;

/// The floor added to [`TRUTH_MULTIPLE`] times swak's error, in units of the dtype's machine
/// epsilon times the tensor's largest magnitude: where swak happens to round exactly (or a
/// tensor is tiny), a few units in the last place of tch-mix's still pass.
pub const TRUTH_FLOOR_EPS: f64 = 16.0;

/// Absolute and relative tolerance of the elementwise rule, applied where a fixture has no
/// float64 truth (version 1 files, float64 fixtures):
/// `|actual - expected| <= atol * max(1, scale) + rtol * |expected|`, where `scale` is the
/// largest finite magnitude of the expected tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute tolerance (for tensors of magnitude up to 1; it grows with larger ones).
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

/// The elementwise tolerance tch-mix promises against swak for a dtype, where a fixture has no
/// float64 truth (float64 fixtures, version 1 files).
pub fn tolerance(kind: Kind) -> Tolerance {
    match kind {
        Kind::Double => Tolerance { atol: 1e-12, rtol: 1e-10 },
        Kind::Float => Tolerance { atol: 1e-5, rtol: 1e-5 },
        Kind::Half => Tolerance { atol: 1e-3, rtol: 1e-3 },
        _ => Tolerance { atol: 1e-2, rtol: 1.6e-2 },
    }
}

/// The machine epsilon of a floating-point dtype (the gap between 1 and the next number).
pub fn epsilon(kind: Kind) -> f64 {
    match kind {
        Kind::Double => f64::EPSILON,
        Kind::Half => 2f64.powi(-10),
        Kind::BFloat16 => 2f64.powi(-7),
        _ => f64::from(f32::EPSILON),
    }
}

/// How a [`Comparison`] was judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// tch-mix's largest error from the float64 truth (computed by swak in float64 from the same
    /// weights and input) is at most `multiple` times swak's own (the larger of its error on the
    /// fixture and its `swak_error.<name>` on neighbouring problems, where present) plus `floor`
    /// times the truth's largest magnitude ([`TRUTH_MULTIPLE`], [`TRUTH_FLOOR_EPS`] times the
    /// dtype's epsilon).
    Truth {
        /// The multiple of swak's error allowed.
        multiple: f64,
        /// The floor, relative to the tensor's scale.
        floor: f64,
    },
    /// Every element within a [`Tolerance`] of swak's value.
    Elementwise(Tolerance),
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Truth { multiple, floor } => {
                write!(
                    f,
                    "float64 truth: tch-mix's error <= {multiple} x swak's (here or on \
                     neighbours) + {floor:.1e} x scale"
                )
            }
            Rule::Elementwise(t) => write!(
                f,
                "elementwise: |tch-mix - swak| <= {:.0e} x max(1, scale) + {:.0e} x |swak|",
                t.atol, t.rtol
            ),
        }
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
    /// `output`, `importance`, `grad.input`, `grad.state.<key>`, `output (no grad)` or
    /// `importance (both)`.
    pub name: String,
    /// The rule that judged it.
    pub rule: Rule,
    /// Largest absolute difference from swak's value (infinite if the shapes or the
    /// NaN/infinity pattern differ), over the elements compared.
    pub max_abs: f64,
    /// Largest difference from swak's value relative to its magnitude, over non-zero values.
    pub max_rel: f64,
    /// Under [`Rule::Truth`]: tch-mix's and swak's largest errors from the truth, and the error
    /// the rule allows tch-mix.
    pub truth: Option<TruthErrors>,
    /// Elements whose NaN/infinity pattern differs from swak's (NaN, +inf, -inf, finite).
    pub mismatched: usize,
    /// Elements the fixture's `ignore.<name>` leaves out: values that depend on the order of
    /// floating-point sums, defined by no implementation.
    pub ignored: usize,
    /// How much of what the rule allows tch-mix's largest error uses: at most 1 passes
    /// (infinite for a mismatch of shape or of the NaN/infinity pattern).
    pub used: f64,
    /// Whether it passed.
    pub passed: bool,
}

/// The errors of a [`Rule::Truth`] comparison, over the elements finite in tch-mix's result,
/// swak's and the truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TruthErrors {
    /// tch-mix's largest absolute error from the truth.
    pub tch_mix: f64,
    /// swak's largest absolute error from the truth (in the fixture's dtype).
    pub swak: f64,
    /// swak's largest error on the fixture's neighbouring problems (`swak_error.<name>`), where
    /// the fixture has it.
    pub swak_neighbours: Option<f64>,
    /// The largest the rule allows for tch-mix.
    pub allowed: f64,
}

impl std::fmt::Display for Comparison {
    /// `name: tch-mix 1.7e-04, swak 2.3e-04 from the float64 truth (allowed 9.4e-04)`, or
    /// `name: 1.2e-14 from swak (elementwise)`, with what was left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.truth {
            Some(t) => {
                write!(f, "{}: tch-mix {:.1e}, swak {:.1e}", self.name, t.tch_mix, t.swak)?;
                if let Some(near) = t.swak_neighbours {
                    write!(f, " ({near:.1e} on neighbours)")?;
                }
                write!(f, " from the float64 truth (allowed {:.1e})", t.allowed)?;
            }
            None => write!(f, "{}: {:.1e} from swak (elementwise)", self.name, self.max_abs)?,
        }
        if self.mismatched > 0 {
            write!(f, ", {} NaN/inf differ from swak's", self.mismatched)?;
        }
        if self.ignored > 0 {
            write!(f, ", {} values left out (order of sums)", self.ignored)?;
        }
        Ok(())
    }
}

/// The result of checking one fixture.
#[derive(Debug)]
pub struct Report {
    /// The mixer (`global`, ...).
    pub mixer: String,
    /// The dtype name (`float32`, ...).
    pub dtype: String,
    /// The rule applied: [`Rule::Truth`] where the fixture carries the float64 truth.
    pub rule: Rule,
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

    /// The comparison that uses the most of what its rule allows ([`Comparison::used`]).
    pub fn worst(&self) -> Option<&Comparison> {
        self.comparisons.iter().max_by(|a, b| a.used.total_cmp(&b.used))
    }

    /// Writes [`Report::computed`] to a safetensors file.
    ///
    /// # Errors
    /// [`MixError::Io`] for what the file system refuses.
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
    ///
    /// # Errors
    /// [`MixError::Io`] or [`MixError::Format`] for a file that is not a safetensors fixture of a
    /// format in [`FORMATS`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .map_err(|source| MixError::Io { path: path.display().to_string(), source })?;
        let not_a_fixture = |what: &str| MixError::Format {
            path: path.display().to_string(),
            reason: format!(
                "{what}, not a tch-mix fixture (a safetensors file written by \
                 tch_mix_tools.export_fixture; `tch-mix-export-fixture --weights` takes a \
                 torch.save file)"
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
        if !FORMATS.contains(&format) {
            return Err(fixture.error(format!("format {format:?}, expected one of {FORMATS:?}")));
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
    ///
    /// # Errors
    /// [`MixError::Format`] where the metadata is incomplete or the weights do not fit it.
    pub fn build(&self, path: &nn::Path) -> Result<Box<dyn Mixer>> {
        self.check_state()?;
        let spec = Spec::from_metadata(|key| self.metadata.get(key).cloned())
            .map_err(|e| self.error(e.to_string()))?;
        spec.build(path)
    }

    /// Builds the mixer on `device`, loads `state.*` strictly, runs forward (eval) and importance
    /// (and the gradient block when present), and compares everything with the fixture.
    ///
    /// # Errors
    /// A malformed fixture (missing tensors, a truth or ignore mask of the wrong shape, weights
    /// that do not fit its metadata). A mismatch with swak is no error: it is a comparison that did
    /// not pass ([`Report::passed`]).
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
        let has_truth = self.has_truth()?;
        let rule = if has_truth {
            Rule::Truth { multiple: TRUTH_MULTIPLE, floor: TRUTH_FLOOR_EPS * epsilon(kind) }
        } else {
            Rule::Elementwise(tolerance(kind))
        };
        // Inference (no autograd) may take other paths than training: compare it as well, and
        // the one call that returns both.
        let (output, both_importance) =
            tch::no_grad(|| mixer.f_forward_and_importance_t(&inp, mask.as_ref(), false))?;
        let inference = [
            ("output (no grad)", "output", &output),
            ("importance (both)", "importance", &both_importance),
        ];
        let mut comparisons = Vec::with_capacity(computed.len() + inference.len());
        let named = computed.iter().map(|(name, t)| (name.as_str(), name.as_str(), t));
        for (label, name, actual) in named.chain(inference) {
            comparisons.push(self.judge(label, name, actual)?);
        }
        Ok(Report {
            mixer: self.meta("mixer")?.to_string(),
            dtype: self.meta("dtype")?.to_string(),
            rule,
            comparisons,
            computed,
        })
    }

    /// Judges `actual`, tch-mix's value of the fixture's result `name` (`output`, `importance`,
    /// `grad.input`, `grad.state.<key>`), as [`Fixture::check`] does: against the truth with
    /// swak's error here and on the neighbouring problems where the fixture has the truth, else
    /// elementwise; leaving out what `ignore.<name>` marks. The comparison is named `label`.
    ///
    /// # Errors
    /// A missing `name`, or a malformed `truth.<name>`, `ignore.<name>` or `swak_error.<name>`.
    pub fn judge(&self, label: &str, name: &str, actual: &Tensor) -> Result<Comparison> {
        let kind = self.kind()?;
        let expected = self.tensor(name)?;
        let ignore = self.ignore_mask(name, expected)?;
        if !self.has_truth()? {
            return judge(
                label,
                actual,
                expected,
                None,
                ignore,
                Rule::Elementwise(tolerance(kind)),
            );
        }
        let truth = self.truth_of(name, expected)?;
        let rule = Rule::Truth { multiple: TRUTH_MULTIPLE, floor: TRUTH_FLOOR_EPS * epsilon(kind) };
        let near = self.swak_error(name)?;
        judge_with(label, actual, expected, Some(truth), ignore, near, rule)
    }

    /// `swak_error.<name>` where present: one finite, non-negative floating-point number.
    fn swak_error(&self, name: &str) -> Result<Option<f64>> {
        let Some(error) = self.tensors.get(&format!("swak_error.{name}")) else {
            return Ok(None);
        };
        let value = match (is_float(error.kind()), error.numel()) {
            (true, 1) => error.f_to_kind(Kind::Double)?.f_double_value(&[])?,
            _ => f64::NAN,
        };
        if value.is_finite() && value >= 0.0 {
            return Ok(Some(value));
        }
        Err(self.error(format!(
            "swak_error.{name} is {:?} {:?}, expected one finite non-negative number",
            error.kind(),
            error.size()
        )))
    }

    /// Whether the fixture carries the float64 truth (metadata `truth` = `float64`); then every
    /// compared tensor has its `truth.<name>`.
    pub fn has_truth(&self) -> Result<bool> {
        match self.metadata.get("truth").map(String::as_str) {
            None => Ok(false),
            Some("float64") => Ok(true),
            Some(other) => {
                Err(self.error(format!("metadata \"truth\" = {other:?}, expected \"float64\"")))
            }
        }
    }

    /// `truth.<name>`, which must be a floating-point tensor of the shape of `<name>`.
    fn truth_of(&self, name: &str, expected: &Tensor) -> Result<&Tensor> {
        let truth = self.tensor(&format!("truth.{name}"))?;
        if truth.size() != expected.size() || !is_float(truth.kind()) {
            return Err(self.error(format!(
                "truth.{name} is {:?} {:?}, expected a floating-point tensor of {name}'s shape {:?}",
                truth.kind(),
                truth.size(),
                expected.size()
            )));
        }
        Ok(truth)
    }

    /// `ignore.<name>` where present: a bool tensor of the shape of `<name>`.
    fn ignore_mask(&self, name: &str, expected: &Tensor) -> Result<Option<&Tensor>> {
        let Some(ignore) = self.tensors.get(&format!("ignore.{name}")) else {
            return Ok(None);
        };
        if ignore.kind() != Kind::Bool || ignore.size() != expected.size() {
            return Err(self.error(format!(
                "ignore.{name} is {:?} {:?}, expected a bool tensor of {name}'s shape {:?}",
                ignore.kind(),
                ignore.size(),
                expected.size()
            )));
        }
        Ok(Some(ignore))
    }

    /// Replaces (or adds) the tensor `name`, returning the one it replaced: for tests that
    /// inject a mistake (changed weights, a mask off by one feature) and must see the check fail.
    pub fn replace_tensor(&mut self, name: &str, tensor: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.to_string(), tensor)
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Double | Kind::Float | Kind::Half | Kind::BFloat16)
}

/// The gradient accumulated on `t`, zeros where `t` did not take part in the loss.
fn gradient(t: &Tensor) -> Result<Tensor> {
    let grad = t.grad();
    Ok(if grad.defined() { grad } else { t.f_zeros_like()? })
}

/// Compares `actual` with swak's `expected` elementwise ([`Rule::Elementwise`]), in f64 on the
/// CPU: NaN must meet NaN and an infinity the same infinity; finite values must lie within
/// `tolerance` (whose `atol` grows with the tensor's largest finite magnitude).
pub fn compare(
    name: &str,
    actual: &Tensor,
    expected: &Tensor,
    tolerance: Tolerance,
) -> Result<Comparison> {
    judge(name, actual, expected, None, None, Rule::Elementwise(tolerance))
}

/// Compares `actual` and swak's `expected` with the float64 `truth` ([`Rule::Truth`] with
/// [`TRUTH_MULTIPLE`] and [`TRUTH_FLOOR_EPS`] for `expected`'s dtype): NaN and infinities must
/// sit where swak's do; over the values finite in all three, tch-mix's largest error from the
/// truth must stay within the multiple of swak's plus the floor. swak's error here is the one
/// of `expected` alone; [`Fixture::judge`] also takes the fixture's errors on neighbouring
/// problems (`swak_error.<name>`) into account, as [`Fixture::check`] does.
pub fn compare_to_truth(
    name: &str,
    actual: &Tensor,
    expected: &Tensor,
    truth: &Tensor,
) -> Result<Comparison> {
    let floor = TRUTH_FLOOR_EPS * epsilon(expected.kind());
    judge(
        name,
        actual,
        expected,
        Some(truth),
        None,
        Rule::Truth { multiple: TRUTH_MULTIPLE, floor },
    )
}

/// The values of `t` as f64, flattened, on the CPU.
fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
    Ok(Vec::<f64>::try_from(&flat)?)
}

/// NaN, +inf, -inf or finite.
fn class(x: f64) -> u8 {
    match x {
        _ if x.is_nan() => 0,
        f64::INFINITY => 1,
        f64::NEG_INFINITY => 2,
        _ => 3,
    }
}

/// One comparison under `rule` (`truth` is given for [`Rule::Truth`]), leaving out the elements
/// where `ignore` is true.
fn judge(
    name: &str,
    actual: &Tensor,
    expected: &Tensor,
    truth: Option<&Tensor>,
    ignore: Option<&Tensor>,
    rule: Rule,
) -> Result<Comparison> {
    judge_with(name, actual, expected, truth, ignore, None, rule)
}

/// [`judge`], with swak's largest error on the neighbouring problems (`near`) where known.
fn judge_with(
    name: &str,
    actual: &Tensor,
    expected: &Tensor,
    truth: Option<&Tensor>,
    ignore: Option<&Tensor>,
    near: Option<f64>,
    rule: Rule,
) -> Result<Comparison> {
    let mut comparison = Comparison {
        name: name.to_string(),
        rule,
        max_abs: f64::INFINITY,
        max_rel: f64::INFINITY,
        truth: None,
        mismatched: 0,
        ignored: 0,
        used: f64::INFINITY,
        passed: false,
    };
    if actual.size() != expected.size() {
        return Ok(comparison);
    }
    let (a, e) = (to_f64(actual)?, to_f64(expected)?);
    let t = match (rule, truth) {
        (Rule::Truth { .. }, Some(truth)) => to_f64(truth)?,
        (Rule::Truth { .. }, None) => {
            return Err(MixError::Config(format!("{name}: the truth rule needs a truth")))
        }
        (Rule::Elementwise(_), _) => Vec::new(),
    };
    let skip = match ignore {
        Some(ignore) => Vec::<bool>::try_from(&ignore.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?,
        None => Vec::new(),
    };
    let (mut max_abs, mut max_rel, mut scale) = (0.0f64, 0.0f64, 0.0f64);
    let (mut mismatched, mut ignored) = (0, 0);
    // Pairs of finite values to judge: (tch-mix, swak, truth or NaN).
    let mut finite = Vec::with_capacity(a.len());
    for (i, (&a, &e)) in a.iter().zip(&e).enumerate() {
        if skip.get(i).copied().unwrap_or(false) {
            ignored += 1;
            continue;
        }
        if class(a) != class(e) {
            mismatched += 1;
            continue;
        }
        if !a.is_finite() {
            continue;
        }
        let diff = if a == e { 0.0 } else { (a - e).abs() };
        max_abs = max_abs.max(diff);
        if e != 0.0 {
            max_rel = max_rel.max(diff / e.abs());
        }
        let t = t.get(i).copied().unwrap_or(f64::NAN);
        match rule {
            Rule::Truth { .. } if t.is_finite() => scale = scale.max(t.abs()),
            Rule::Truth { .. } => continue,
            Rule::Elementwise(_) => scale = scale.max(e.abs()),
        }
        finite.push((a, e, t));
    }
    comparison.mismatched = mismatched;
    comparison.ignored = ignored;
    if mismatched > 0 {
        return Ok(comparison);
    }
    comparison.max_abs = max_abs;
    comparison.max_rel = max_rel;
    comparison.used = match rule {
        Rule::Elementwise(tolerance) => {
            let atol = tolerance.atol * scale.max(1.0);
            let used = |&(a, e, _): &(f64, f64, f64)| {
                let diff = if a == e { 0.0 } else { (a - e).abs() };
                diff / (atol + tolerance.rtol * e.abs())
            };
            finite.iter().map(used).fold(0.0, f64::max)
        }
        Rule::Truth { multiple, floor } => {
            let (mut tch_mix, mut swak) = (0.0f64, 0.0f64);
            for &(a, e, t) in &finite {
                tch_mix = tch_mix.max((a - t).abs());
                swak = swak.max((e - t).abs());
            }
            let allowed = multiple * swak.max(near.unwrap_or(0.0)) + floor * scale;
            comparison.truth = Some(TruthErrors { tch_mix, swak, swak_neighbours: near, allowed });
            if tch_mix == 0.0 {
                0.0
            } else if allowed == 0.0 {
                f64::INFINITY
            } else {
                tch_mix / allowed
            }
        }
    };
    comparison.passed = comparison.used <= 1.0;
    Ok(comparison)
}
