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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use tch::{nn, Kind, Tensor};
use zip::{CompressionMethod, ZipArchive};

use crate::error::{MixError, Result};
use crate::spec::Spec;

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

/// Named tensors and the string metadata of a safetensors file.
pub(crate) type SafetensorsContent = (Vec<(String, Tensor)>, HashMap<String, String>);

/// Reads every tensor (sorted by name) and the `__metadata__` of a safetensors buffer.
pub(crate) fn read_safetensors(bytes: &[u8], path: &Path) -> Result<SafetensorsContent> {
    let index = index_safetensors(bytes, path)?;
    let mut entries = Vec::with_capacity(index.tensors.len());
    for (name, kind, shape, range) in index.tensors {
        let data = &bytes[index.data_start + range.start..index.data_start + range.end];
        let tensor = Tensor::f_from_data_size(data, &shape, kind)
            .map_err(|e| format_error(path, format!("tensor {name:?}: {e}")))?;
        entries.push((name, tensor));
    }
    Ok((entries, index.metadata))
}

/// Reads a safetensors file tensor by tensor: loading costs the tensors plus one tensor's
/// bytes, not the whole file twice. The safetensors crate checks the header against a buffer
/// of the file's length; that buffer is a fresh zeroed allocation of which only the header's
/// pages are written (the allocator maps large zeroed blocks lazily, so the rest costs no
/// memory), and each tensor is read from the file into its own place.
fn read_safetensors_file(mut file: File, path: &Path) -> Result<SafetensorsContent> {
    let io_error = |source| MixError::Io { path: path.display().to_string(), source };
    let len = file.metadata().map_err(io_error)?.len();
    let len = usize::try_from(len).map_err(|_| format_error(path, "file too large"))?;
    let mut buffer = vec![0u8; len];
    file.seek(SeekFrom::Start(0)).map_err(io_error)?;
    let prefix = len.min(8);
    file.read_exact(&mut buffer[..prefix]).map_err(io_error)?;
    if let Ok(n) = <[u8; 8]>::try_from(&buffer[..prefix]) {
        // A header longer than the file, or than the crate reads (100 MB), is the crate's to
        // report without reading it; else read the header, as much of it as the file holds.
        let n = u64::from_le_bytes(n);
        if n <= SAFETENSORS_MAX_HEADER {
            let header_end = (n as usize).saturating_add(8).min(len);
            file.read_exact(&mut buffer[8..header_end]).map_err(io_error)?;
        }
    }
    let index = index_safetensors(&buffer, path)?;
    drop(buffer);
    let mut entries = Vec::with_capacity(index.tensors.len());
    let mut data = Vec::new();
    for (name, kind, shape, range) in index.tensors {
        file.seek(SeekFrom::Start((index.data_start + range.start) as u64)).map_err(io_error)?;
        data.clear();
        data.resize(range.len(), 0);
        file.read_exact(&mut data).map_err(io_error)?;
        let tensor = Tensor::f_from_data_size(&data, &shape, kind)
            .map_err(|e| format_error(path, format!("tensor {name:?}: {e}")))?;
        entries.push((name, tensor));
    }
    Ok((entries, index.metadata))
}

/// The longest header the safetensors crate (0.3) reads, in bytes.
const SAFETENSORS_MAX_HEADER: u64 = 100_000_000;

/// A safetensors header, checked: where the data begins, and each tensor's name, dtype, shape
/// and byte range within the data (sorted by name), and the `__metadata__`.
struct SafetensorsIndex {
    data_start: usize,
    tensors: Vec<(String, Kind, Vec<i64>, std::ops::Range<usize>)>,
    metadata: HashMap<String, String>,
}

/// Reads the header of a safetensors buffer (the file's length, with at least its header),
/// checked by the safetensors crate against that length.
fn index_safetensors(buffer: &[u8], path: &Path) -> Result<SafetensorsIndex> {
    use safetensors::SafeTensors;
    let not_safetensors = |e: safetensors::SafeTensorError| {
        format_error(path, format!("neither a torch.save zip archive nor safetensors ({e:?})"))
    };
    check_safetensors_offsets(buffer).map_err(not_safetensors)?;
    let (header_len, metadata) = SafeTensors::read_metadata(buffer).map_err(not_safetensors)?;
    let infos = metadata.tensors();
    if infos.len() > MAX_TENSORS {
        return Err(format_error(
            path,
            format!("{} tensors, more than the {MAX_TENSORS} tch-mix reads", infos.len()),
        ));
    }
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let kind = Kind::try_from(info.dtype)
            .map_err(|e| format_error(path, format!("tensor {name:?}: {e}")))?;
        let shape: Option<Vec<i64>> = info.shape.iter().map(|&n| i64::try_from(n).ok()).collect();
        let shape = shape.ok_or_else(|| format_error(path, format!("tensor {name:?}: size")))?;
        let (start, end) = info.data_offsets;
        tensors.push((name, kind, shape, start..end));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(SafetensorsIndex {
        data_start: header_len + 8,
        tensors,
        metadata: metadata.metadata().clone().unwrap_or_default(),
    })
}

/// Parses a JSON object of strings, the form of a safetensors `__metadata__`, with the
/// safetensors crate's own parser: as the `__metadata__` of a header without tensors.
pub(crate) fn parse_metadata(json: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    const OPEN: &[u8] = b"{\"__metadata__\":";
    let not_strings = || "not a JSON object of strings".to_string();
    let header_len = OPEN.len() + json.len() + 1;
    let mut header = Vec::with_capacity(8 + header_len);
    header.extend_from_slice(&(header_len as u64).to_le_bytes());
    header.extend_from_slice(OPEN);
    header.extend_from_slice(json);
    header.push(b'}');
    let (_, parsed) =
        safetensors::SafeTensors::read_metadata(&header).map_err(|_| not_strings())?;
    if !parsed.tensors().is_empty() {
        return Err(not_strings());
    }
    Ok(parsed.metadata().clone().unwrap_or_default().into_iter().collect())
}

/// The safetensors crate (0.3) adds the data's end offset to the header's length unchecked: an
/// offset near `usize::MAX` panics there in debug builds. No offset can exceed the file's length,
/// so this refuses the header first if a number in a `"data_offsets": [...]` array does.
fn check_safetensors_offsets(
    bytes: &[u8],
) -> std::result::Result<(), safetensors::SafeTensorError> {
    let Some(len) = bytes.get(..8) else { return Ok(()) };
    let len = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    let Some(header) = usize::try_from(len).ok().and_then(|n| bytes.get(8..n.checked_add(8)?))
    else {
        return Ok(()); // the crate reports this one cleanly
    };
    const KEY: &[u8] = b"\"data_offsets\"";
    let mut rest = header;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let array = rest.iter().position(|b| !b" \t\r\n:".contains(b));
        if array.map(|i| rest[i]) != Some(b'[') {
            continue;
        }
        let end = rest.iter().position(|&b| b == b']').unwrap_or(rest.len());
        for number in rest[..end].split(|b| !b.is_ascii_digit()).filter(|n| !n.is_empty()) {
            let text = String::from_utf8_lossy(number);
            if text.parse::<u64>().map_or(true, |n| n > bytes.len() as u64) {
                return Err(safetensors::SafeTensorError::InvalidOffset(text.into()));
            }
        }
    }
    Ok(())
}

/// Reads a `torch.save` zip archive: `<top>/data.pkl` plus one `<top>/data/<key>` per storage,
/// and the state dict at `key` in its pickle (see [`Pickled::select`]).
fn read_torch_zip(file: File, path: &Path, key: Option<&str>) -> Result<StateDict> {
    let bad = |reason: String| format_error(path, reason);
    let mut reader = WindowedFile::new(file).map_err(|e| bad(e.to_string()))?;
    let file_len = reader.len;
    check_zip_end(&mut reader).map_err(bad)?;
    let archive = ZipArchive::new(reader)
        .map_err(|e| bad(format!("not a readable torch.save zip archive ({e})")))?;
    let mut archive = TorchArchive::new(archive, file_len).map_err(bad)?;
    if let Some(order) = archive.read_optional("byteorder", 16).map_err(bad)? {
        if order != b"little" {
            let order = String::from_utf8_lossy(&order);
            return Err(bad(format!("byte order {order:?} is not supported")));
        }
    }
    let selected = {
        let pickle = archive.read("data.pkl", MAX_PICKLE_BYTES).map_err(bad)?;
        if pickle.len() as u64 > MAX_PICKLE_BYTES {
            return Err(bad(format!(
                "{}data.pkl is larger than {MAX_PICKLE_BYTES} bytes (tch-mix's MAX_PICKLE_BYTES)",
                archive.top
            )));
        }
        let pickled = Unpickler::new(&pickle).run().map_err(|e| bad(format!("data.pkl: {e}")))?;
        pickled.select(key).map_err(|e| bad(format!("data.pkl: {e}")))?
        // The pickle and its tables go here, before any storage is read.
    };
    let metadata =
        if selected.is_default { archive.metadata().map_err(bad)? } else { BTreeMap::new() };
    let specs = selected.tensors;
    let mut storages: HashMap<String, (Kind, i64, Tensor)> = HashMap::new();
    let mut entries = Vec::with_capacity(specs.len());
    for spec in specs {
        if !storages.contains_key(&spec.storage) {
            let base = archive.storage(&spec.storage, spec.kind, spec.numel).map_err(bad)?;
            storages.insert(spec.storage.clone(), (spec.kind, spec.numel, base));
        }
        let (kind, numel, base) = &storages[&spec.storage];
        if (*kind, *numel) != (spec.kind, spec.numel) {
            return Err(bad(format!(
                "{:?}: storage {:?} is declared as {} elements of {:?} and elsewhere as {numel} \
                 elements of {kind:?}",
                spec.key, spec.storage, spec.numel, spec.kind
            )));
        }
        let tensor = spec.view(base).map_err(|e| bad(format!("{:?}: {e}", spec.key)))?;
        entries.push((spec.key, tensor));
    }
    let mut state = StateDict::new(entries);
    state.metadata = metadata;
    Ok(state)
}

/// A file read through a 64 KiB window, so that seeking costs nothing. The zip reader seeks back
/// and forth (byte by byte while it looks for the end of the archive), which would make a
/// `BufReader` drop and refill its buffer at every step.
struct WindowedFile {
    file: File,
    len: u64,
    pos: u64,
    start: u64,
    window: Vec<u8>,
}

impl WindowedFile {
    const WINDOW: u64 = 64 << 10;

    fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { file, len, pos: 0, start: 0, window: Vec::new() })
    }
}

impl Read for WindowedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.len {
            return Ok(0);
        }
        let end = self.start + self.window.len() as u64;
        if !(self.start..end).contains(&self.pos) {
            if buf.len() as u64 >= Self::WINDOW {
                // A large read (a storage): straight from the file.
                self.file.seek(SeekFrom::Start(self.pos))?;
                let n = self.file.read(buf)?;
                self.pos += n as u64;
                return Ok(n);
            }
            self.start = self.pos - self.pos % Self::WINDOW;
            self.file.seek(SeekFrom::Start(self.start))?;
            self.window.clear();
            (&mut self.file).take(Self::WINDOW).read_to_end(&mut self.window)?;
            if self.pos >= self.start + self.window.len() as u64 {
                return Ok(0);
            }
        }
        let offset = (self.pos - self.start) as usize;
        let n = buf.len().min(self.window.len() - offset);
        buf[..n].copy_from_slice(&self.window[offset..offset + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for WindowedFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad seek"))?;
        Ok(self.pos)
    }
}

/// Checks the zip's end records before the zip reader trusts them. That reader reserves room for
/// as many entries as a ZIP64 end record claims (up to the file's length: an abort on a large
/// file), and when the ZIP64 record is not where its locator points, it searches for it byte by
/// byte up to the end of the file. PyTorch writes the record where its locator points, and at
/// most [`MAX_ZIP_ENTRIES`] entries.
fn check_zip_end(reader: &mut WindowedFile) -> std::result::Result<(), String> {
    const EOCD: u64 = 22;
    let len = reader.len;
    let mut read_at = |pos: u64, n: u64| -> io::Result<Vec<u8>> {
        reader.seek(SeekFrom::Start(pos))?;
        let mut bytes = Vec::with_capacity(n as usize);
        (&mut *reader).take(n).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let tail_len = len.min(EOCD + u64::from(u16::MAX));
    let tail = read_at(len - tail_len, tail_len).map_err(|e| e.to_string())?;
    // The zip reader takes the last end record (its signature alone) within the tail.
    let Some(at) = tail
        .len()
        .checked_sub(EOCD as usize)
        .and_then(|last| (0..=last).rev().find(|&i| tail[i..].starts_with(b"PK\x05\x06")))
    else {
        return Ok(()); // not a zip archive: the zip reader says so
    };
    let comment_len = u64::from(u16::from_le_bytes([tail[at + 20], tail[at + 21]]));
    // Where the zip reader looks for the ZIP64 locator: before the record and its comment.
    let Some(locator_at) = len.checked_sub(20 + EOCD + comment_len) else { return Ok(()) };
    let locator = read_at(locator_at, 20).map_err(|e| e.to_string())?;
    if !locator.starts_with(b"PK\x06\x07") || locator.len() < 16 {
        return Ok(());
    }
    let record_at = u64::from_le_bytes(locator[8..16].try_into().expect("8 bytes"));
    let record = read_at(record_at, 40).map_err(|e| e.to_string())?;
    if !record.starts_with(b"PK\x06\x06") || record.len() < 40 {
        return Err(format!(
            "the ZIP64 end record is not at offset {record_at}, where its locator points"
        ));
    }
    let entries = u64::from_le_bytes(record[32..40].try_into().expect("8 bytes"));
    if entries > MAX_ZIP_ENTRIES {
        return Err(format!(
            "the zip archive claims {entries} entries, more than the {MAX_ZIP_ENTRIES} tch-mix \
             reads (MAX_ZIP_ENTRIES)"
        ));
    }
    Ok(())
}

/// A zip archive laid out as `torch.save` writes it: every entry in one top-level folder, with
/// `<top>/data.pkl` among them, no name twice.
struct TorchArchive {
    archive: ZipArchive<WindowedFile>,
    /// The top-level folder with its slash, `archive/`.
    top: String,
    file_len: u64,
}

impl TorchArchive {
    fn new(archive: ZipArchive<WindowedFile>, file_len: u64) -> std::result::Result<Self, String> {
        let mut names: Vec<&str> = archive.file_names().collect();
        if names.len() != archive.len() {
            return Err(Self::duplicate(archive));
        }
        // Sorted, so that what is reported does not depend on the zip reader's hash order.
        names.sort_unstable();
        let mut top: Option<&str> = None;
        for name in &names {
            let Some((folder, _)) = name.split_once('/') else {
                return Err(format!(
                    "entry {name:?} is not in a folder: not written by torch.save"
                ));
            };
            match top {
                None => top = Some(folder),
                Some(first) if first != folder => {
                    return Err(format!(
                        "entries in two top-level folders, {first:?} and {folder:?}: a \
                         torch.save archive has one, and tch-mix does not guess which is meant"
                    ));
                }
                Some(_) => {}
            }
        }
        let top = format!("{}/", top.unwrap_or_default());
        if names.binary_search(&format!("{top}data.pkl").as_str()).is_err() {
            return Err(format!("zip archive without {top}data.pkl: not written by torch.save"));
        }
        Ok(Self { archive, top, file_len })
    }

    /// The error for an archive that names one entry twice (found by index, in file order).
    fn duplicate(mut archive: ZipArchive<WindowedFile>) -> String {
        let mut seen = HashSet::new();
        for i in 0..archive.len() {
            match archive.by_index_raw(i) {
                Ok(entry) if !seen.insert(entry.name().to_string()) => {
                    return format!(
                        "entry {:?} appears twice in the zip archive: refusing to pick one",
                        entry.name()
                    );
                }
                Ok(_) => {}
                Err(e) => return format!("zip entry {i}: {e}"),
            }
        }
        "an entry appears twice in the zip archive".to_string()
    }

    /// Reads `<top>/<name>`, at most `limit + 1` bytes of it (so that the caller can tell an
    /// entry longer than `limit`), or `None` if there is no such entry.
    fn read_optional(
        &mut self,
        name: &str,
        limit: u64,
    ) -> std::result::Result<Option<Vec<u8>>, String> {
        let name = format!("{}{name}", self.top);
        let entry = match self.archive.by_name(&name) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(format!("{name}: {e}")),
        };
        match entry.compression() {
            CompressionMethod::Stored | CompressionMethod::Deflated => {}
            other => {
                return Err(format!(
                    "{name}: compression method {other} is not supported (torch.save stores its \
                     entries uncompressed; torch.load reads stored and deflated ones)"
                ))
            }
        }
        // Reserve what the entry should hold, but never more than the zip entry says it holds
        // or the file could: the pickle's numbers are not trusted with an allocation (nor the
        // zip's; a lie only costs the vector's growth).
        let reserve = limit.min(entry.size()).min(self.file_len).saturating_add(1);
        let mut data = Vec::with_capacity(usize::try_from(reserve).unwrap_or(0));
        entry
            .take(limit.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Some(data))
    }

    /// Reads `<top>/<name>` as [`TorchArchive::read_optional`], which must exist.
    fn read(&mut self, name: &str, limit: u64) -> std::result::Result<Vec<u8>, String> {
        let top = &self.top;
        let missing = format!("{top}{name} is missing");
        self.read_optional(name, limit)?.ok_or(missing)
    }

    /// The metadata in `<top>/tch_mix.json` ([`METADATA_ENTRY`]), empty without that entry.
    fn metadata(&mut self) -> std::result::Result<BTreeMap<String, String>, String> {
        let name = format!("{}{METADATA_ENTRY}", self.top);
        let Some(text) = self.read_optional(METADATA_ENTRY, MAX_METADATA_BYTES)? else {
            return Ok(BTreeMap::new());
        };
        if text.len() as u64 > MAX_METADATA_BYTES {
            return Err(format!(
                "{name} is larger than {MAX_METADATA_BYTES} bytes (tch-mix's MAX_METADATA_BYTES)"
            ));
        }
        parse_metadata(&text).map_err(|e| format!("{name}: {e}"))
    }

    /// The storage `<top>/data/<key>` as a flat tensor of its declared dtype and length.
    fn storage(
        &mut self,
        key: &str,
        kind: Kind,
        numel: i64,
    ) -> std::result::Result<Tensor, String> {
        let name = format!("data/{key}");
        let elt_size = kind.elt_size_in_bytes() as u64;
        let bytes = u64::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(elt_size))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                format!(
                    "{}{name}: {} elements of {:?} overflow a byte count",
                    self.top, numel, kind
                )
            })?;
        let data = self.read(&name, bytes)?;
        if data.len() as u64 != bytes {
            let found = if data.len() as u64 > bytes {
                format!("more than {bytes} bytes")
            } else {
                format!("{} bytes", data.len())
            };
            return Err(format!(
                "{}{name}: {found} for {} elements of {:?} ({bytes} bytes declared)",
                self.top, numel, kind
            ));
        }
        // (f_from_data_size copies numel x element size bytes without looking at the slice's
        // length: the check above is what keeps it inside `data`.)
        Tensor::f_from_data_size(&data, &[numel], kind)
            .map_err(|e| format!("{}{name}: {e}", self.top))
    }
}

fn storage_kind(name: &str) -> Option<Kind> {
    let kind = match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    };
    Some(kind)
}

/// The callables and types a state-dict pickle may name with GLOBAL.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    /// `collections.OrderedDict`.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2`.
    RebuildTensor,
    /// `torch._utils._rebuild_parameter`.
    RebuildParameter,
    /// `torch.FloatStorage` and the like.
    Storage(Kind),
}

impl Global {
    fn new(module: &str, name: &str) -> Option<Self> {
        match (module, name) {
            ("collections", "OrderedDict") => Some(Self::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Self::RebuildTensor),
            ("torch._utils", "_rebuild_parameter") => Some(Self::RebuildParameter),
            ("torch", name) => storage_kind(name).map(Self::Storage),
            _ => None,
        }
    }
}

/// One pickled value: a small `Copy` handle. Strings, tuples, dicts, storages and tensors live in
/// the tables of [`Pickled`] and are referenced by index, so copying a value (the memo, BINGET)
/// shares it, like Python does, and costs 8 bytes.
#[derive(Debug, Clone, Copy)]
enum Value {
    None,
    Bool,
    /// A float's value is never needed by a state dict; only its place.
    Float,
    Int(i32),
    /// An int outside `i32`: index into `Pickled::longs`.
    Long(u32),
    /// Index into `Pickled::strs`.
    Str(u32),
    /// Index into `Pickled::tuples`.
    Tuple(u32),
    /// A list's items are never needed by a state dict, so they are not kept.
    List,
    /// A dict's id; its items are the entries of `Pickled::dict_items` with this id.
    Dict(u32),
    Global(Global),
    /// Index into `Pickled::storages`.
    Storage(u32),
    /// Index into `Pickled::tensors`.
    Tensor(u32),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) | Value::Long(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// A storage as named by a pickled persistent id: `('storage', torch.FloatStorage, key, location, numel)`.
#[derive(Debug, Clone, Copy)]
struct StorageRef {
    kind: Kind,
    /// Index into `Pickled::strs`.
    key: u32,
    numel: i64,
}

/// The arguments of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, with
/// size and stride as tuples of ints of the same length (checked when it was built).
#[derive(Debug, Clone, Copy)]
struct TensorRef {
    /// Index into `Pickled::storages`.
    storage: u32,
    offset: i64,
    /// Index into `Pickled::tuples`.
    size: u32,
    /// Index into `Pickled::tuples`.
    stride: u32,
}

/// What a pickle built: flat tables that [`Value`]s index into, and the root object.
struct Pickled<'a> {
    /// The pickle itself: strings are ranges of it.
    data: &'a [u8],
    /// `(start, end)` of each string in `data`, checked to be UTF-8.
    strs: Vec<(u32, u32)>,
    longs: Vec<i64>,
    /// `(start, end)` of each tuple's items in `tuple_items`.
    tuples: Vec<(u32, u32)>,
    tuple_items: Vec<Value>,
    dicts: u32,
    /// `(dict id, key, value)`, in the order they were set; a key set twice appears twice.
    dict_items: Vec<(u32, Value, Value)>,
    storages: Vec<StorageRef>,
    tensors: Vec<TensorRef>,
    root: Value,
}

type PickleResult<T> = std::result::Result<T, String>;

impl<'a> Pickled<'a> {
    fn str(&self, index: u32) -> &'a str {
        let (start, end) = self.strs[index as usize];
        std::str::from_utf8(&self.data[start as usize..end as usize]).expect("checked when read")
    }

    fn tuple(&self, index: u32) -> &[Value] {
        let (start, end) = self.tuples[index as usize];
        &self.tuple_items[start as usize..end as usize]
    }

    fn int(&self, value: Value) -> Option<i64> {
        match value {
            Value::Int(n) => Some(i64::from(n)),
            Value::Long(i) => Some(self.longs[i as usize]),
            _ => None,
        }
    }

    fn ints(&self, tuple: u32) -> Vec<i64> {
        self.tuple(tuple).iter().map(|&v| self.int(v).expect("checked when built")).collect()
    }

    /// The state dict at `key` (see [`StateDict::from_file_key`]), or by default the pickled
    /// object if it is a state dict, else its `model` entry; owned, so that the pickle and its
    /// tables can go before any storage is read.
    fn select(&self, key: Option<&str>) -> PickleResult<Selected> {
        let (items, is_default) = match key {
            None => (self.default_items()?, true),
            Some(path) => {
                let value = self.lookup(path)?;
                let what = if path.is_empty() {
                    "the pickled object".to_string()
                } else {
                    format!("entry {:?}", shorten(path))
                };
                let items = self.state_items(value, &what)?;
                let root_is_state = self.state_items(self.root, "the pickled object").is_ok();
                let is_default = match path {
                    "" => root_is_state,
                    "model" => !root_is_state,
                    _ => false,
                };
                (items, is_default)
            }
        };
        Ok(Selected { tensors: self.specs(items), is_default })
    }

    /// The pickled object if it is a state dict, else the `model` entry of a pickled dict (a
    /// swak `Checkpoint`), which must be one.
    fn default_items(&self) -> PickleResult<Vec<(&'a str, TensorRef)>> {
        let root_error = match self.state_items(self.root, "the pickled object") {
            Ok(items) => return Ok(items),
            Err(e) => e,
        };
        if !matches!(self.root, Value::Dict(_)) {
            return Err(root_error);
        }
        match self.child(self.root, "model") {
            Some(model) => self.state_items(model, "entry \"model\""),
            None => Err(format!(
                "{root_error}; nor is it a checkpoint with a \"model\" entry: give the key of the \
                 entry that holds the state dict ({})",
                self.entries_of(self.root)
            )),
        }
    }

    /// The value at a path of dict keys and tuple positions joined by dots.
    fn lookup(&self, path: &str) -> PickleResult<Value> {
        let mut value = self.root;
        if path.is_empty() {
            return Ok(value);
        }
        let mut walked = "";
        for (at, segment) in path.split('.').enumerate() {
            let Some(child) = self.child(value, segment) else {
                let place = if at == 0 {
                    "the pickled object".to_string()
                } else {
                    format!("entry {:?}", shorten(walked))
                };
                return Err(format!(
                    "no entry {:?} in {place} ({})",
                    shorten(segment),
                    self.entries_of(value)
                ));
            };
            walked = &path[..walked.len() + usize::from(at > 0) + segment.len()];
            value = child;
        }
        Ok(value)
    }

    /// The entry `segment` of a dict (its last value, as in Python: a string key, or an int key
    /// written as its digits) or of a tuple (a position).
    fn child(&self, value: Value, segment: &str) -> Option<Value> {
        match value {
            Value::Dict(dict) => {
                let int = segment.parse::<i64>().ok().filter(|n| n.to_string() == segment);
                let matches = |key: Value| match key {
                    Value::Str(s) => self.str(s) == segment,
                    Value::Int(_) | Value::Long(_) => int.is_some() && self.int(key) == int,
                    _ => false,
                };
                // The last value set wins, as in Python.
                let mut items = self.dict_items.iter().rev();
                items.find(|&&(d, k, _)| d == dict && matches(k)).map(|&(_, _, v)| v)
            }
            Value::Tuple(tuple) => {
                let position = segment.parse::<usize>().ok().filter(|n| n.to_string() == segment);
                position.and_then(|i| self.tuple(tuple).get(i).copied())
            }
            _ => None,
        }
    }

    /// What a value's entries are, for an error message: at most 20 keys with their types.
    fn entries_of(&self, value: Value) -> String {
        const SHOWN: usize = 20;
        match value {
            Value::Dict(dict) => {
                let mut seen = HashSet::new();
                let mut shown = Vec::new();
                for &(_, key, value) in self.dict_items.iter().filter(|&&(d, _, _)| d == dict) {
                    let name = match key {
                        Value::Str(s) => format!("{:?}", shorten(self.str(s))),
                        Value::Int(_) | Value::Long(_) => self.int(key).unwrap_or(0).to_string(),
                        other => format!("<{}>", other.type_name()),
                    };
                    if seen.insert(name.clone()) {
                        if shown.len() == SHOWN {
                            shown.push("...".to_string());
                            break;
                        }
                        shown.push(format!("{name}: {}", value.type_name()));
                    }
                }
                if shown.is_empty() {
                    "it is an empty dict".to_string()
                } else {
                    format!("its entries: {}", shown.join(", "))
                }
            }
            Value::Tuple(tuple) => {
                format!("a tuple of {} items, selected by position", self.tuple(tuple).len())
            }
            other => format!("{} has no entries", a(other.type_name())),
        }
    }

    /// A dict's tensors in the order Python's dict would hold them (a key set twice keeps its
    /// first place and its last value), every key a string, every value a tensor, at most
    /// [`MAX_TENSORS`]; `what` names the value in an error.
    fn state_items(&self, value: Value, what: &str) -> PickleResult<Vec<(&'a str, TensorRef)>> {
        let Value::Dict(dict) = value else {
            return Err(format!("{what} is {}, not a state dict", a(value.type_name())));
        };
        let mut items: Vec<(&str, TensorRef)> = Vec::new();
        let mut place: HashMap<&str, usize> = HashMap::new();
        for &(d, key, value) in &self.dict_items {
            if d != dict {
                continue;
            }
            let Value::Str(key) = key else {
                let reason = format!("key {} is not a string", a(key.type_name()));
                return Err(format!("{what} is not a state dict: {reason}"));
            };
            let key = self.str(key);
            let Value::Tensor(tensor) = value else {
                let reason = format!("{key:?} holds {}, not a tensor", a(value.type_name()));
                return Err(format!("{what} is not a state dict: {reason}"));
            };
            let tensor = self.tensors[tensor as usize];
            match place.get(key) {
                Some(&i) => items[i].1 = tensor,
                None => {
                    if items.len() == MAX_TENSORS {
                        return Err(format!(
                            "more than {MAX_TENSORS} tensors (tch-mix's MAX_TENSORS)"
                        ));
                    }
                    place.insert(key, items.len());
                    items.push((key, tensor));
                }
            }
        }
        Ok(items)
    }

    /// Owned descriptions of the tensors of a state dict.
    fn specs(&self, items: Vec<(&str, TensorRef)>) -> Vec<TensorSpec> {
        let spec = |(key, tensor): (&str, TensorRef)| {
            let storage = self.storages[tensor.storage as usize];
            TensorSpec {
                key: key.to_string(),
                storage: self.str(storage.key).to_string(),
                kind: storage.kind,
                numel: storage.numel,
                offset: tensor.offset,
                size: self.ints(tensor.size),
                stride: self.ints(tensor.stride),
            }
        };
        items.into_iter().map(spec).collect()
    }
}

/// A type name with its article: `a tuple`, `an int`.
fn a(type_name: &str) -> String {
    let article = if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {type_name}")
}

/// The state dict that [`Pickled::select`] found.
struct Selected {
    tensors: Vec<TensorSpec>,
    /// Whether it is the one that [`StateDict::from_file`] reads, which a file's metadata
    /// describes.
    is_default: bool,
}

/// One tensor of a state dict as its pickle describes it: a view of a storage.
#[derive(Debug)]
struct TensorSpec {
    key: String,
    /// The storage's key: its data is `<top>/data/<storage>`.
    storage: String,
    /// The storage's dtype and element count.
    kind: Kind,
    numel: i64,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl TensorSpec {
    /// The tensor as a view of its storage `base`, bounds checked first: nothing is copied.
    fn view(&self, base: &Tensor) -> PickleResult<Tensor> {
        check_view(self.offset, &self.size, &self.stride, self.numel)?;
        base.f_as_strided(&self.size, &self.stride, Some(self.offset)).map_err(|e| e.to_string())
    }
}

/// Checks that a view `(offset, size, stride)` lies inside a storage of `numel` elements, in
/// checked arithmetic, naming the field that is wrong.
fn check_view(offset: i64, size: &[i64], stride: &[i64], numel: i64) -> PickleResult<()> {
    if offset < 0 {
        return Err(format!("storage offset {offset} is negative"));
    }
    for (dim, (&n, &s)) in size.iter().zip(stride).enumerate() {
        if n < 0 {
            return Err(format!("size[{dim}] = {n} is negative"));
        }
        if s < 0 {
            return Err(format!("stride[{dim}] = {s} is negative"));
        }
    }
    let elements = size.iter().try_fold(1i64, |acc, &n| acc.checked_mul(n));
    let elements =
        elements.ok_or_else(|| format!("the element count of size {size:?} overflows i64"))?;
    if elements == 0 {
        if offset > numel {
            return Err(format!(
                "storage offset {offset} lies past its storage of {numel} elements"
            ));
        }
        return Ok(());
    }
    // The last element the view reaches: offset + sum((size - 1) * stride).
    let last = size.iter().zip(stride).try_fold(offset, |acc, (&n, &s)| {
        (n - 1).checked_mul(s).and_then(|step| acc.checked_add(step))
    });
    let last = last.ok_or_else(|| {
        format!("the extent of offset {offset}, size {size:?}, stride {stride:?} overflows i64")
    })?;
    if last >= numel {
        return Err(format!(
            "view (offset {offset}, size {size:?}, stride {stride:?}) reaches element {last}, past \
             its storage of {numel} elements"
        ));
    }
    Ok(())
}

/// A pickle reader for state dicts: it interprets the opcodes that `torch.save` writes for one
/// and builds [`Value`]s, calling no Python and refusing every other global.
struct Unpickler<'a> {
    out: Pickled<'a>,
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK (Python's metastack): items below the last mark are out of
    /// reach until it is popped.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        let out = Pickled {
            data,
            strs: Vec::new(),
            longs: Vec::new(),
            tuples: Vec::new(),
            tuple_items: Vec::new(),
            dicts: 0,
            dict_items: Vec::new(),
            storages: Vec::new(),
            tensors: Vec::new(),
            root: Value::None,
        };
        Self { out, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }
    }

    fn take(&mut self, n: usize) -> PickleResult<&'a [u8]> {
        let data = self.out.data;
        let end = self.pos.checked_add(n).filter(|&end| end <= data.len());
        let end = end.ok_or_else(|| "truncated pickle".to_string())?;
        let bytes = &data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn uint(&mut self, n: usize) -> PickleResult<u64> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn len(&mut self, n: usize) -> PickleResult<usize> {
        usize::try_from(self.uint(n)?).map_err(|_| "length out of range".to_string())
    }

    fn line(&mut self) -> PickleResult<&'a str> {
        let rest = &self.out.data[self.pos..];
        let len = rest.iter().position(|&b| b == b'\n').ok_or("truncated pickle")?;
        self.pos += len + 1;
        std::str::from_utf8(&rest[..len]).map_err(|e| e.to_string())
    }

    fn push(&mut self, value: Value) {
        self.stack.push(value);
    }

    fn push_int(&mut self, n: i64) -> PickleResult<()> {
        let value = match i32::try_from(n) {
            Ok(n) => Value::Int(n),
            Err(_) => {
                let long = Value::Long(index(self.out.longs.len())?);
                self.out.longs.push(n);
                long
            }
        };
        self.push(value);
        Ok(())
    }

    fn push_str(&mut self, n: usize) -> PickleResult<()> {
        let start = self.pos;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
        let range = (index(start)?, index(self.pos)?);
        let value = Value::Str(index(self.out.strs.len())?);
        self.out.strs.push(range);
        self.push(value);
        Ok(())
    }

    /// The length of the stack above the last mark.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> PickleResult<Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> PickleResult<Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    /// Pops the last mark; the items above it stay on the stack, from the returned position.
    fn pop_mark(&mut self) -> PickleResult<usize> {
        self.marks.pop().ok_or_else(|| "missing MARK".to_string())
    }

    fn tuple_from(&mut self, start: usize) -> PickleResult<Value> {
        let value = Value::Tuple(index(self.out.tuples.len())?);
        let from = index(self.out.tuple_items.len())?;
        self.out.tuple_items.extend(self.stack.drain(start..));
        self.out.tuples.push((from, index(self.out.tuple_items.len())?));
        Ok(value)
    }

    /// Sets the `(key, value)` pairs `stack[start..]` on the dict below them.
    fn set_items(&mut self, start: usize) -> PickleResult<()> {
        if (self.stack.len() - start) % 2 != 0 {
            return Err("odd number of items for SETITEMS".into());
        }
        let dict = match start.checked_sub(1).filter(|&i| i >= self.floor()) {
            Some(i) => self.stack[i],
            None => return Err("stack underflow".into()),
        };
        let Value::Dict(dict) = dict else {
            return Err(format!("SETITEMS on a {}", dict.type_name()));
        };
        for pair in self.stack[start..].chunks_exact(2) {
            if let Value::List | Value::Dict(_) = pair[0] {
                return Err(format!("unhashable dict key: {}", pair[0].type_name()));
            }
            self.out.dict_items.push((dict, pair[0], pair[1]));
        }
        self.stack.truncate(start);
        Ok(())
    }

    fn memo_put(&mut self, index: u64) -> PickleResult<()> {
        let index = u32::try_from(index).map_err(|_| "memo index out of range")?;
        let value = self.top()?;
        if self.memo.len() >= MAX_MEMO_ENTRIES && !self.memo.contains_key(&index) {
            return Err(format!(
                "more than {MAX_MEMO_ENTRIES} memo entries (tch-mix's MAX_MEMO_ENTRIES)"
            ));
        }
        self.memo.insert(index, value);
        Ok(())
    }

    fn memo_get(&mut self, index: u64) -> PickleResult<()> {
        let value = u32::try_from(index).ok().and_then(|i| self.memo.get(&i).copied());
        let value = value.ok_or_else(|| format!("memo {index} is empty"))?;
        self.push(value);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> PickleResult<()> {
        let global = Global::new(module, name).ok_or_else(|| {
            format!(
                "refusing global \"{}.{}\": tch-mix reads what torch.load(weights_only=True) \
                 reads of state dicts and checkpoints (dicts, lists, tuples, numbers, strings, \
                 tensors); if this is a whole pickled module (torch.save(model), swak's \
                 ModelSaver), save its state_dict() instead",
                shorten(module),
                shorten(name)
            )
        })?;
        self.push(Value::Global(global));
        Ok(())
    }

    fn new_dict(&mut self) -> PickleResult<Value> {
        let dict = Value::Dict(self.out.dicts);
        self.out.dicts = self.out.dicts.checked_add(1).ok_or("too many dicts")?;
        Ok(dict)
    }

    fn reduce(&mut self, callable: Value, args: Value) -> PickleResult<Value> {
        let (Value::Global(global), Value::Tuple(args)) = (callable, args) else {
            return Err(format!(
                "REDUCE of a {} with a {} is not allowed",
                callable.type_name(),
                args.type_name()
            ));
        };
        let out = &self.out;
        let tensor = match (global, out.tuple(args)) {
            (Global::OrderedDict, []) => return self.new_dict(),
            (Global::RebuildParameter, &[tensor @ Value::Tensor(_), ..]) => return Ok(tensor),
            (
                Global::RebuildTensor,
                &[Value::Storage(storage), offset, Value::Tuple(size), Value::Tuple(stride), ..],
            ) => {
                let offset = out.int(offset).ok_or("tensor offset is not an int")?;
                let dims = out.tuple(size).len();
                if dims != out.tuple(stride).len() {
                    return Err(format!(
                        "tensor size has {dims} dimensions, its stride {}",
                        out.tuple(stride).len()
                    ));
                }
                if dims > MAX_DIMS {
                    return Err(format!(
                        "tensor of {dims} dimensions, more than {MAX_DIMS} (tch-mix's MAX_DIMS)"
                    ));
                }
                let all_ints = |t| out.tuple(t).iter().all(|&v| out.int(v).is_some());
                if !(all_ints(size) && all_ints(stride)) {
                    return Err("tensor size or stride holds a non-int".into());
                }
                TensorRef { storage, offset, size, stride }
            }
            (global, _) => return Err(format!("unexpected arguments for {global:?}")),
        };
        let value = Value::Tensor(index(self.out.tensors.len())?);
        self.out.tensors.push(tensor);
        Ok(value)
    }

    fn persistent_load(&mut self, pid: Value) -> PickleResult<Value> {
        let Value::Tuple(pid) = pid else {
            return Err(format!("persistent id is a {}, not a tuple", pid.type_name()));
        };
        let out = &self.out;
        let &[Value::Str(tag), Value::Global(Global::Storage(kind)), Value::Str(key), Value::Str(_), numel] =
            out.tuple(pid)
        else {
            return Err("persistent id is not a storage reference".into());
        };
        if out.str(tag) != "storage" {
            return Err("persistent id is not a storage reference".into());
        }
        let numel = out.int(numel).filter(|&n| n >= 0);
        let numel = numel.ok_or("storage numel is not a non-negative int")?;
        let value = Value::Storage(index(out.storages.len())?);
        self.out.storages.push(StorageRef { kind, key, numel });
        Ok(value)
    }

    /// Runs the pickle to its STOP and returns what it built.
    fn run(mut self) -> PickleResult<Pickled<'a>> {
        let mut opcodes = 0u64;
        loop {
            opcodes += 1;
            if opcodes > MAX_PICKLE_OPCODES {
                return Err(format!(
                    "more than {MAX_PICKLE_OPCODES} opcodes (tch-mix's MAX_PICKLE_OPCODES)"
                ));
            }
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    self.take(1)?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => {
                    self.out.root = self.pop()?;
                    return Ok(self.out);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push(Value::None),
                0x88 | 0x89 => self.push(Value::Bool),
                b'K' => {
                    let n = self.uint(1)?;
                    self.push_int(n as i64)?;
                }
                b'M' => {
                    let n = self.uint(2)?;
                    self.push_int(n as i64)?;
                }
                b'J' => {
                    let n = self.uint(4)? as u32 as i32;
                    self.push_int(i64::from(n))?;
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.len(1)?;
                    if n > 8 {
                        return Err("integer too large".into());
                    }
                    let bytes = self.take(n)?;
                    let mut value =
                        bytes.iter().rev().fold(0i64, |acc, &b| (acc << 8) | i64::from(b));
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        value -= 1i64 << (8 * n);
                    }
                    self.push_int(value)?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Float);
                }
                b'X' => {
                    let n = self.len(4)?;
                    self.push_str(n)?;
                }
                0x8c => {
                    let n = self.len(1)?;
                    self.push_str(n)?;
                }
                0x8d => {
                    let n = self.len(8)?;
                    self.push_str(n)?;
                }
                b')' => {
                    let start = self.stack.len();
                    let tuple = self.tuple_from(start)?;
                    self.push(tuple);
                }
                b't' => {
                    let start = self.pop_mark()?;
                    let tuple = self.tuple_from(start)?;
                    self.push(tuple);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let start = self.stack.len().checked_sub(n).filter(|&s| s >= self.floor());
                    let start = start.ok_or("stack underflow")?;
                    let tuple = self.tuple_from(start)?;
                    self.push(tuple);
                }
                b']' => self.push(Value::List),
                b'}' => {
                    let dict = self.new_dict()?;
                    self.push(dict);
                }
                b'a' => {
                    self.pop()?;
                    if !matches!(self.top()?, Value::List) {
                        return Err("APPEND to a non-list".into());
                    }
                }
                b'e' => {
                    let start = self.pop_mark()?;
                    self.stack.truncate(start);
                    if !matches!(self.top()?, Value::List) {
                        return Err("APPENDS to a non-list".into());
                    }
                }
                b's' => {
                    let start = self.stack.len().checked_sub(2).filter(|&s| s >= self.floor());
                    self.set_items(start.ok_or("stack underflow")?)?;
                }
                b'u' => {
                    let start = self.pop_mark()?;
                    self.set_items(start)?;
                }
                b'q' => {
                    let index = self.uint(1)?;
                    self.memo_put(index)?;
                }
                b'r' => {
                    let index = self.uint(4)?;
                    self.memo_put(index)?;
                }
                0x94 => {
                    let index = self.memo.len() as u64;
                    self.memo_put(index)?;
                }
                b'h' => {
                    let index = self.uint(1)?;
                    self.memo_get(index)?;
                }
                b'j' => {
                    let index = self.uint(4)?;
                    self.memo_get(index)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let (Value::Str(name), Value::Str(module)) = (self.pop()?, self.pop()?) else {
                        return Err("STACK_GLOBAL needs two strings".into());
                    };
                    let (module, name) = (self.out.str(module), self.out.str(name));
                    self.global(module, name)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let value = self.reduce(callable, args)?;
                    self.push(value);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let value = self.persistent_load(pid)?;
                    self.push(value);
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict is its `_metadata` attribute; dropped.
                    self.pop()?;
                    if !matches!(self.top()?, Value::Dict(_)) {
                        return Err("BUILD is only allowed on a dict".into());
                    }
                }
                op => return Err(format!("pickle opcode 0x{op:02x} is not part of a state dict")),
            }
        }
    }
}

/// A table index as `u32`: no table can outgrow it within [`MAX_PICKLE_OPCODES`] and
/// [`MAX_PICKLE_BYTES`], but the conversion is checked all the same.
fn index(n: usize) -> PickleResult<u32> {
    u32::try_from(n).map_err(|_| "pickle too large".to_string())
}

/// At most 100 characters of a name from the file, for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(100) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}
