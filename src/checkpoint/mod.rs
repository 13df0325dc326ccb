//! Reading PyTorch-trained weights and loading them strictly.
//!
//! [`StateDict::from_file`] reads `.safetensors` files and files written by `torch.save` (a zip
//! archive holding a pickle): a state dict, or a checkpoint that holds one, such as swak's
//! `Checkpoint` (`{'epoch', 'loss', 'model', 'optimizer', 'scheduler'}`), from which it takes
//! `model` ([`StateDict::from_file_key`] takes any entry). The pickle is never executed: a small
//! reader accepts what `torch.load(weights_only=True)` reads of such files (dicts and
//! `OrderedDict`s, lists, tuples, strings, numbers, bools, `None`, and tensors rebuilt by
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` from the `torch.*Storage` types) and
//! refuses anything else, a pickled module included.
//!
//! The reader is built for files it did not write. A pickled value is a small `Copy` handle into
//! flat tables, so sharing one through the memo costs 8 bytes however big it is, and nothing is
//! recursive: no nesting depth can overflow the stack while a value is built, read or dropped.
//! Dict items are appended, and only the selected state dict is de-duplicated, once, at the end.
//! Every size, stride, offset and element count is checked arithmetic; a tensor is a view of
//! its storage, never a copy (a stride-0 view of one stored number allocates nothing); no zip
//! entry is read past the size that its storage declares, and only the selected state dict's
//! storages are read. The `MAX_*` constants below bound what a file can make the reader do; each
//! is far above what a real state dict needs.
//!
//! Files written by tch-mix ([`StateDict::save`]) carry each mixer's class and hyper-parameters
//! as metadata ([`METADATA_PREFIX`], [`METADATA_ENTRY`]); [`StateDict::metadata`] holds what a
//! file carries and [`StateDict::spec`] reads a mixer's [`Spec`] from it.
//!
//! [`Mixer::load_state`](crate::Mixer::load_state) and [`load_var_store`] copy the weights like
//! `load_state_dict(strict=True)`: one error lists every missing key, every unexpected key and
//! every shape mismatch, and nothing is copied unless everything fits.

mod pickle;
mod safetensors_file;
mod torch_zip;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use tch::{nn, Kind, Tensor};

use crate::error::{MixError, Result};
use crate::spec::Spec;

use self::safetensors_file::read_safetensors_file;
pub(crate) use self::safetensors_file::{parse_metadata, read_safetensors};
use self::torch_zip::read_torch_zip;

// The limits below are sized together: a real state dict of `MAX_TENSORS` tensors stays within
// each of them, and a file at all of them at once makes the pickle reader hold at most about
// 16 MiB of pickle and 40 MiB of tables (8 bytes per stack item, tuple item or memo slot, 20 per
// dict item), however well it compresses; the tensors themselves cost libtorch about 0.6 KiB
// each, and the tables are freed before any is made.

/// The largest `data.pkl` read, in bytes (16 MiB). `torch.save` writes 100 to 250 bytes of
/// pickle per tensor.
pub const MAX_PICKLE_BYTES: u64 = 16 << 20;

/// The most pickle opcodes interpreted (2^22). `torch.save` writes about 35 per tensor.
pub const MAX_PICKLE_OPCODES: u64 = 1 << 22;

/// The most memo entries (2^20). `torch.save` writes about 9 per tensor.
pub const MAX_MEMO_ENTRIES: usize = 1 << 20;

/// The most tensors in one state dict or safetensors file (2^16 = 65,536). A 70B-parameter
/// transformer has under 1,000, a 235B mixture of experts with 128 experts per layer some 37,000.
pub const MAX_TENSORS: usize = 1 << 16;

/// The most entries in a `torch.save` zip archive, checked before the zip reader allocates its
/// table of entries: one per storage, plus the few records `torch.save` adds.
pub const MAX_ZIP_ENTRIES: u64 = MAX_TENSORS as u64 + 1024;

/// The most dimensions of one tensor.
pub const MAX_DIMS: usize = 64;

/// The largest metadata entry ([`METADATA_ENTRY`]) read from a `torch.save` archive, in bytes
/// (64 KiB; a mixer's hyper-parameters take some 200).
pub const MAX_METADATA_BYTES: u64 = 64 << 10;

/// The first part of every metadata key that tch-mix writes: a mixer at `prefix` in the state
/// dict is described by `tch_mix.<prefix>.mixer`, `tch_mix.<prefix>.mod_dim`, ... (by
/// `tch_mix.mixer`, ... for a mixer at the root), the keys of [`Spec::to_metadata`].
pub const METADATA_PREFIX: &str = "tch_mix";

/// The entry of a `torch.save` archive, `<top>/tch_mix.json`, that holds a [`StateDict`]'s
/// metadata: the same JSON object of strings as a safetensors file's `__metadata__`.
/// `torch.load` reads only the entries its pickle names, so it never looks at this one.
pub const METADATA_ENTRY: &str = "tch_mix.json";

/// The names of a mixer's fields in the metadata ([`Spec::to_metadata`]'s keys).
const SPEC_FIELDS: [&str; 8] =
    ["mixer", "mod_dim", "n_features", "n_heads", "bias", "dropout", "skip", "keep_dim"];

/// Named tensors in the order of the file, keyed as in PyTorch's `state_dict()`, and the string
/// metadata the file carries (a safetensors file's `__metadata__`, or the [`METADATA_ENTRY`] of
/// a `torch.save` archive that tch-mix wrote).
#[derive(Default)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
    /// Position of each key in `entries` (the first, if a key repeats).
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl StateDict {
    /// Wraps named tensors, without metadata.
    pub fn new(entries: Vec<(String, Tensor)>) -> Self {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, (key, _)) in entries.iter().enumerate() {
            index.entry(key.clone()).or_insert(i);
        }
        Self { entries, index, metadata: BTreeMap::new() }
    }

    /// The weights of `mixer` under `prefix` (`mix` gives `mix.coeffs`, ...; empty for none) in
    /// swak's `state_dict()` order, with the mixer's [`Spec`] as metadata at that prefix. The
    /// tensors are the mixer's own (shallow clones), ready for [`StateDict::save`].
    pub fn from_mixer<M: crate::Mixer + ?Sized>(mixer: &M, prefix: &str) -> Self {
        let entries = mixer.variables().into_iter().map(|(key, t)| (dotted(prefix, key), t));
        let mut state = Self::new(entries.collect());
        state.set_spec(prefix, &mixer.spec());
        state
    }

    /// Every variable of `vs` under its VarStore name (`mix.coeffs`, `head.weight`, ...), with
    /// `prefix.` in front if `prefix` is not empty, sorted by name (a VarStore keeps no order).
    /// No metadata: add a mixer's spec with [`StateDict::set_spec`].
    pub fn from_var_store(vs: &nn::VarStore, prefix: &str) -> Self {
        let mut entries: Vec<(String, Tensor)> =
            vs.variables().into_iter().map(|(key, t)| (dotted(prefix, &key), t)).collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(entries)
    }

    /// Reads a `.safetensors` file or a `torch.save` zip archive, told apart by their first
    /// bytes. From a `torch.save` file it takes the pickled dict if that is a state dict, else
    /// its `model` entry, as in swak's `Checkpoint` files (an error lists the entries if there is
    /// none). Tensors stay on the CPU in their stored dtype; those of a zip archive are views of
    /// its storages, as in PyTorch (tensors that shared a storage still share it).
    ///
    /// # Errors
    /// [`MixError::Io`] where the file cannot be opened; [`MixError::Format`] naming the file and
    /// what is wrong for anything that is not a state dict within the reader's bounds (truncated,
    /// corrupt, a pickled object other than a state dict, the legacy pre-zip format).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        read_file(path.as_ref(), None)
    }

    /// Reads the state dict at `key` in a `torch.save` checkpoint: a path of dict keys (or
    /// tuple positions) joined by dots, such as `model`, `ema.model` or `optimizer.state.0`
    /// (an int key is written as its digits); empty for the pickled object itself. An error
    /// lists the entries where a key is missing, and says what the entry holds if it is not a
    /// state dict. Metadata comes with the state dict that [`StateDict::from_file`] would read
    /// (the root or `model`), for which a file's metadata is written, and not with other entries.
    /// A safetensors file holds one flat state dict and takes no key.
    ///
    /// # Errors
    /// As [`StateDict::from_file`], and [`MixError::Format`] listing the entries where `key` is
    /// missing.
    pub fn from_file_key(path: impl AsRef<Path>, key: &str) -> Result<Self> {
        read_file(path.as_ref(), Some(key))
    }

    /// Writes the state dict and its metadata to `path`: safetensors for `.safetensors`, a
    /// `torch.save` zip archive for `.pt` or `.pth` (which `torch.load(path, weights_only=True)`
    /// reads as an `OrderedDict`, with the metadata in its [`METADATA_ENTRY`]); any other
    /// extension is an error. Keys, shapes and dtypes are kept; every tensor is written as a
    /// contiguous copy on the CPU (in chunks, so a large tensor costs no second copy at once).
    ///
    /// The write is atomic: the file is written to a temporary file next to `path`, synced to
    /// disk, then renamed to `path`; on any error the temporary file is removed and `path` is
    /// left as it was.
    ///
    /// # Errors
    /// [`MixError::Config`] for an extension other than `.safetensors`, `.pt` or `.pth`;
    /// [`MixError::Io`] for what the file system refuses. On any error `path` is as it was.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::save::save(self, path.as_ref())
    }

    /// The keys, in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(key, _)| key.as_str())
    }

    /// The tensor under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// All `(key, tensor)` pairs, in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(k, t)| (k.as_str(), t))
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The string metadata: what the file carried, or what [`StateDict::set_spec`] added.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The metadata, to add entries of your own (they are saved with the tensors).
    pub fn metadata_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.metadata
    }

    /// The [`Spec`] of the mixer at `prefix` (empty for the root) that the metadata describes,
    /// `None` if it describes none there; an error if it does so incompletely.
    ///
    /// # Errors
    /// [`MixError::Config`] naming the entry that is missing or does not parse.
    pub fn spec(&self, prefix: &str) -> Result<Option<Spec>> {
        let base = dotted(METADATA_PREFIX, prefix);
        if !self.metadata.contains_key(&format!("{base}.mixer")) {
            return Ok(None);
        }
        let spec = Spec::from_metadata(|key| self.metadata.get(&format!("{base}.{key}")).cloned());
        spec.map(Some).map_err(|e| MixError::Config(format!("{base}.*: {e}")))
    }

    /// Describes the mixer at `prefix` (empty for the root) by `spec` in the metadata, replacing
    /// what described one there before.
    pub fn set_spec(&mut self, prefix: &str, spec: &Spec) {
        let base = dotted(METADATA_PREFIX, prefix);
        for field in SPEC_FIELDS {
            self.metadata.remove(&format!("{base}.{field}"));
        }
        for (key, value) in spec.to_metadata() {
            self.metadata.insert(format!("{base}.{key}"), value);
        }
    }

    /// The entries under `prefix.` with the prefix stripped: the weights of one sub-module of a
    /// bigger model (`mix.project.weight` becomes `project.weight` for prefix `mix`).
    /// An empty prefix keeps everything. The metadata of tch-mix follows (`tch_mix.mix.mixer`
    /// becomes `tch_mix.mixer`; what describes other sub-modules is dropped); other metadata is
    /// kept as it is.
    pub fn sub(&self, prefix: &str) -> Self {
        let dotted_prefix = format!("{prefix}.");
        let entries = self.iter().filter_map(|(k, t)| {
            let key = if prefix.is_empty() { k } else { k.strip_prefix(&dotted_prefix)? };
            Some((key.to_string(), t.shallow_clone()))
        });
        let mut state = Self::new(entries.collect());
        let (ours, base) = (format!("{METADATA_PREFIX}."), dotted(METADATA_PREFIX, prefix) + ".");
        state.metadata = self
            .metadata
            .iter()
            .filter_map(|(key, value)| match key.strip_prefix(&base) {
                Some(rest) => Some((format!("{ours}{rest}"), value.clone())),
                None if key.starts_with(&ours) => None,
                None => Some((key.clone(), value.clone())),
            })
            .collect();
        state
    }

    /// The entries with `prefix.` in front of every key (the inverse of [`StateDict::sub`]): the
    /// state of this module as a sub-module `prefix` of a bigger model. The metadata of tch-mix
    /// moves with it (`tch_mix.mixer` becomes `tch_mix.<prefix>.mixer`).
    pub fn with_prefix(&self, prefix: &str) -> Self {
        let entries = self.iter().map(|(k, t)| (dotted(prefix, k), t.shallow_clone()));
        let mut state = Self::new(entries.collect());
        let ours = format!("{METADATA_PREFIX}.");
        state.metadata = self
            .metadata
            .iter()
            .map(|(key, value)| match key.strip_prefix(&ours) {
                Some(rest) => {
                    (format!("{}.{rest}", dotted(METADATA_PREFIX, prefix)), value.clone())
                }
                None => (key.clone(), value.clone()),
            })
            .collect();
        state
    }

    /// The same entries with every floating-point tensor converted to `kind` (a floating-point
    /// kind); other tensors (integer counters, bool masks) are kept as they are.
    ///
    /// # Errors
    /// [`MixError::Kind`] where `kind` is not a floating-point kind.
    pub fn to_float_kind(&self, kind: Kind) -> Result<Self> {
        if !matches!(kind, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double) {
            return Err(MixError::Config(format!(
                "{kind:?} is not a floating-point dtype (float64, float32, bfloat16, float16)"
            )));
        }
        let mut entries = Vec::with_capacity(self.len());
        for (key, tensor) in self.iter() {
            let tensor = if tensor.is_floating_point() {
                tensor.f_to_kind(kind)?
            } else {
                tensor.shallow_clone()
            };
            entries.push((key.to_string(), tensor));
        }
        let mut state = Self::new(entries);
        state.metadata = self.metadata.clone();
        Ok(state)
    }
}

/// `prefix.key`, or `key` alone for an empty prefix.
fn dotted(prefix: &str, key: &str) -> String {
    match (prefix.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{key}"),
    }
}

impl std::fmt::Debug for StateDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDict")
            .field("entries", &self.entries)
            .field("metadata", &self.metadata)
            .finish()
    }
}

/// Copies `state` into the variables of `vs`, strictly: the VarStore's variable names
/// (`mix.coeffs`, ...) must be exactly the state's keys, with the same shapes. Values are
/// converted to each variable's dtype and device.
///
/// # Errors
/// [`MixError::StrictLoad`] listing every missing key, unexpected key and shape mismatch; nothing
/// is copied unless everything fits.
pub fn load_var_store(vs: &nn::VarStore, state: &StateDict) -> Result<()> {
    copy_strict(vs.variables().into_iter().collect(), state)
}

/// Copies `state` into `targets` after checking that keys and shapes match exactly; reports every
/// problem at once and copies nothing if there is one. `copy_` converts dtype and device on the
/// way, so a view (a stride-0 one included) is only ever materialised into its variable.
pub(crate) fn copy_strict(targets: Vec<(String, Tensor)>, state: &StateDict) -> Result<()> {
    let wanted: HashSet<&str> = targets.iter().map(|(k, _)| k.as_str()).collect();
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (key, target) in &targets {
        match state.get(key) {
            None => missing.push(key.clone()),
            Some(source) if source.size() != target.size() => {
                mismatched.push((key.clone(), target.size(), source.size()))
            }
            Some(_) => {}
        }
    }
    let unexpected: Vec<String> =
        state.keys().filter(|k| !wanted.contains(k)).map(str::to_string).collect();
    if !(missing.is_empty() && unexpected.is_empty() && mismatched.is_empty()) {
        missing.sort();
        return Err(MixError::StrictLoad { missing, unexpected, mismatched });
    }
    tch::no_grad(|| -> Result<()> {
        for (key, mut target) in targets {
            target.f_copy_(state.get(&key).expect("checked above"))?;
        }
        Ok(())
    })
}

/// [`StateDict::from_file`] (`key` `None`) and [`StateDict::from_file_key`].
fn read_file(path: &Path, key: Option<&str>) -> Result<StateDict> {
    let io_error = |source| MixError::Io { path: path.display().to_string(), source };
    let mut file = File::open(path).map_err(io_error)?;
    let mut head = Vec::with_capacity(4);
    (&mut file).take(4).read_to_end(&mut head).map_err(io_error)?;
    match sniff(&head) {
        Sniffed::TorchZip => read_torch_zip(file, path, key),
        Sniffed::TorchLegacy => Err(format_error(path, LEGACY)),
        Sniffed::Other => {
            let (entries, metadata) = read_safetensors_file(file, path)?;
            if let Some(key) = key {
                return Err(format_error(
                    path,
                    format!(
                        "a safetensors file holds one flat state dict, with no entry {key:?} to \
                         select (a key selects an entry of a torch.save checkpoint)"
                    ),
                ));
            }
            let mut state = StateDict::new(entries);
            state.metadata = metadata.into_iter().collect();
            Ok(state)
        }
    }
}

fn format_error(path: &Path, reason: impl Into<String>) -> MixError {
    MixError::Format { path: path.display().to_string(), reason: reason.into() }
}

const LEGACY: &str = "legacy torch.save format (_use_new_zipfile_serialization=False) is not \
                      supported; re-save with torch.save's default";

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sniffed {
    /// A zip archive: what `torch.save` writes by default.
    TorchZip,
    /// A bare pickle: `torch.save(..., _use_new_zipfile_serialization=False)`.
    TorchLegacy,
    /// Anything else, safetensors included.
    Other,
}

/// Tells a `torch.save` file from anything else by its first bytes (`PK\x03\x04` or
/// `PK\x05\x06` for a zip archive; for the legacy format, a pickle's PROTO opcode and the LONG1
/// opcode of PyTorch's magic number, which begins every such file). A lone PROTO byte is not
/// enough: a safetensors file begins with its header's length, whose first byte may be 0x80.
pub(crate) fn sniff(head: &[u8]) -> Sniffed {
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Sniffed::TorchZip
    } else if head.len() >= 4 && head[0] == 0x80 && head[1] <= 5 && head[2..4] == [0x8a, 0x0a] {
        Sniffed::TorchLegacy
    } else {
        Sniffed::Other
    }
}
