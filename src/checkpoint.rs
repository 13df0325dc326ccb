//! Reading PyTorch-trained weights and loading them strictly.
//!
//! [`StateDict::from_file`] reads `.safetensors` files and files written by
//! `torch.save(module.state_dict(), path)` (a zip archive holding a pickle). The pickle is never
//! executed: a small reader accepts only what a state dict is made of (`OrderedDict`, dicts,
//! tuples, strings, numbers, `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` and the
//! `torch.*Storage` types) and refuses anything else, like `torch.load(weights_only=True)`.
//!
//! [`Mixer::load_state`](crate::Mixer::load_state) and [`load_var_store`] copy the weights like
//! `load_state_dict(strict=True)`: one error lists every missing key, every unexpected key and
//! every shape mismatch, and nothing is copied unless everything fits.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use tch::{nn, Kind, Tensor};

use crate::error::{MixError, Result};

/// Named tensors in the order of the file, keyed as in PyTorch's `state_dict()`.
#[derive(Debug, Default)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
}

impl StateDict {
    /// Wraps named tensors.
    pub fn new(entries: Vec<(String, Tensor)>) -> Self {
        Self { entries }
    }

    /// Reads a `.safetensors` file or a `torch.save(state_dict)` zip archive, told apart by their
    /// first bytes. Tensors stay on the CPU in their stored dtype.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_bytes(path)?;
        if bytes.starts_with(b"PK\x03\x04") {
            read_torch_zip(&bytes, path)
        } else if bytes.first() == Some(&0x80) {
            Err(format_error(
                path,
                "legacy torch.save format (_use_new_zipfile_serialization=False) is not supported; \
                 re-save with torch.save's default",
            ))
        } else {
            Ok(Self::new(read_safetensors(&bytes, path)?.0))
        }
    }

    /// The keys, in file order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(key, _)| key.as_str())
    }

    /// The tensor under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, t)| t)
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

    /// The entries under `prefix.` with the prefix stripped: the weights of one sub-module of a
    /// bigger model (`mix.project.weight` becomes `project.weight` for prefix `mix`).
    /// An empty prefix keeps everything.
    pub fn sub(&self, prefix: &str) -> Self {
        if prefix.is_empty() {
            let entries = self.iter().map(|(k, t)| (k.to_string(), t.shallow_clone()));
            return Self::new(entries.collect());
        }
        let dotted = format!("{prefix}.");
        let entries = self
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(&dotted)?.to_string(), t.shallow_clone())));
        Self::new(entries.collect())
    }
}

/// Copies `state` into the variables of `vs`, strictly: the VarStore's variable names
/// (`mix.coeffs`, ...) must be exactly the state's keys, with the same shapes. Values are
/// converted to each variable's dtype and device.
pub fn load_var_store(vs: &nn::VarStore, state: &StateDict) -> Result<()> {
    copy_strict(vs.variables().into_iter().collect(), state)
}

/// Copies `state` into `targets` after checking that keys and shapes match exactly; reports every
/// problem at once and copies nothing if there is one.
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
            let source = state.get(&key).expect("checked above");
            let source = source.f_to_kind(target.kind())?.f_to_device(target.device())?;
            target.f_copy_(&source)?;
        }
        Ok(())
    })
}

fn format_error(path: &Path, reason: impl Into<String>) -> MixError {
    MixError::Format { path: path.display().to_string(), reason: reason.into() }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| MixError::Io { path: path.display().to_string(), source })
}

/// Named tensors and the string metadata of a safetensors file.
pub(crate) type SafetensorsContent = (Vec<(String, Tensor)>, HashMap<String, String>);

/// Reads every tensor (sorted by name) and the `__metadata__` of a safetensors buffer.
pub(crate) fn read_safetensors(bytes: &[u8], path: &Path) -> Result<SafetensorsContent> {
    use safetensors::SafeTensors;
    let not_safetensors = |e: safetensors::SafeTensorError| {
        format_error(path, format!("neither a torch.save zip archive nor safetensors ({e:?})"))
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
    let tensors = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    let mut entries = Vec::with_capacity(tensors.len());
    for (name, view) in tensors.tensors() {
        let tensor = Tensor::try_from(view)
            .map_err(|e| format_error(path, format!("tensor {name:?}: {e}")))?;
        entries.push((name, tensor));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((entries, metadata.metadata().clone().unwrap_or_default()))
}

/// Reads a `torch.save` zip archive: `<dir>/data.pkl` plus one `<dir>/data/<key>` per storage.
fn read_torch_zip(bytes: &[u8], path: &Path) -> Result<StateDict> {
    let bad = |reason: String| format_error(path, reason);
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| bad(format!("not a readable torch.save zip archive ({e})")))?;
    let pickle_name = archive
        .file_names()
        .find(|name| name.ends_with("data.pkl"))
        .map(str::to_string)
        .ok_or_else(|| bad("zip archive without data.pkl: not written by torch.save".into()))?;
    let dir = pickle_name.trim_end_matches("data.pkl").to_string();
    let mut read_entry = |name: &str| -> Result<Option<Vec<u8>>> {
        let mut file = match archive.by_name(name) {
            Ok(file) => file,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(bad(format!("{name}: {e}"))),
        };
        let mut buffer = Vec::new();
        file.read_to_end(&mut buffer).map_err(|e| bad(format!("{name}: {e}")))?;
        Ok(Some(buffer))
    };
    if let Some(order) = read_entry(&format!("{dir}byteorder"))? {
        if order != b"little" {
            return Err(bad(format!(
                "byte order {:?} is not supported",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let pickle = read_entry(&pickle_name)?.expect("listed above");
    let root = Unpickler::new(&pickle).run().map_err(|e| bad(format!("data.pkl: {e}")))?;
    let Value::Dict(items) = root else {
        return Err(bad(format!("the pickled object is a {}, not a state dict", root.type_name())));
    };
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut entries = Vec::with_capacity(items.len());
    for (key, value) in items {
        let Value::Str(key) = key else {
            return Err(bad(format!("state dict key {} is not a string", key.type_name())));
        };
        let Value::Tensor(spec) = value else {
            return Err(bad(format!("{key:?} holds a {}, not a tensor", value.type_name())));
        };
        if !storages.contains_key(&spec.storage.key) {
            let name = format!("{dir}data/{}", spec.storage.key);
            let data = read_entry(&name)?.ok_or_else(|| bad(format!("{name} is missing")))?;
            let storage =
                storage_tensor(&data, &spec.storage).map_err(|e| bad(format!("{name}: {e}")))?;
            storages.insert(spec.storage.key.clone(), storage);
        }
        let tensor =
            spec.view(&storages[&spec.storage.key]).map_err(|e| bad(format!("{key:?}: {e}")))?;
        entries.push((key, tensor));
    }
    Ok(StateDict::new(entries))
}

/// A storage as named by a pickled persistent id: `('storage', torch.FloatStorage, key, location, numel)`.
#[derive(Debug, Clone)]
struct StorageRef {
    kind: Kind,
    key: String,
    numel: i64,
}

/// The arguments of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
#[derive(Debug, Clone)]
struct TensorSpec {
    storage: StorageRef,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl TensorSpec {
    /// The tensor as a contiguous copy of its strided view, bounds checked first.
    fn view(&self, storage: &Tensor) -> std::result::Result<Tensor, String> {
        if self.size.len() != self.stride.len()
            || self.size.iter().chain(&self.stride).any(|&n| n < 0)
        {
            return Err(format!("invalid size {:?} / stride {:?}", self.size, self.stride));
        }
        let numel: i64 = self.size.iter().product();
        if numel > 0 {
            let last = self.offset
                + self.size.iter().zip(&self.stride).map(|(n, s)| (n - 1) * s).sum::<i64>();
            if self.offset < 0 || last >= self.storage.numel {
                return Err(format!(
                    "view (offset {}, size {:?}, stride {:?}) exceeds its storage of {} elements",
                    self.offset, self.size, self.stride, self.storage.numel
                ));
            }
        }
        let view = storage
            .f_as_strided(&self.size, &self.stride, Some(self.offset))
            .and_then(|t| t.f_contiguous())
            .map_err(|e| e.to_string())?;
        Ok(view)
    }
}

fn storage_tensor(data: &[u8], storage: &StorageRef) -> std::result::Result<Tensor, String> {
    let expected = storage.numel as usize * storage.kind.elt_size_in_bytes();
    if data.len() != expected {
        return Err(format!(
            "{} bytes for {} elements of {:?} ({expected} bytes expected)",
            data.len(),
            storage.numel,
            storage.kind
        ));
    }
    Tensor::f_from_data_size(data, &[storage.numel], storage.kind).map_err(|e| e.to_string())
}

fn storage_kind(name: &str) -> Option<Kind> {
    let kind = match name {
        "torch.FloatStorage" => Kind::Float,
        "torch.DoubleStorage" => Kind::Double,
        "torch.HalfStorage" => Kind::Half,
        "torch.BFloat16Storage" => Kind::BFloat16,
        "torch.LongStorage" => Kind::Int64,
        "torch.IntStorage" => Kind::Int,
        "torch.ShortStorage" => Kind::Int16,
        "torch.CharStorage" => Kind::Int8,
        "torch.ByteStorage" => Kind::Uint8,
        "torch.BoolStorage" => Kind::Bool,
        _ => return None,
    };
    Some(kind)
}

/// The values a state-dict pickle is made of.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A callable or type named by GLOBAL, one of the few allowed.
    Global(String),
    Storage(StorageRef),
    Tensor(TensorSpec),
    Mark,
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::Mark => "mark",
        }
    }
}

const ALLOWED_GLOBALS: [&str; 3] = [
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
];

/// A pickle reader for state dicts: it interprets the opcodes that `torch.save` writes for one and
/// builds [`Value`]s, calling no Python and refusing every other global.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

type PickleResult<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0, stack: Vec::new(), memo: HashMap::new() }
    }

    fn take(&mut self, n: usize) -> PickleResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.data.len());
        let end = end.ok_or_else(|| "truncated pickle".to_string())?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn uint(&mut self, n: usize) -> PickleResult<u64> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn line(&mut self) -> PickleResult<String> {
        let rest = &self.data[self.pos..];
        let len = rest.iter().position(|&b| b == b'\n').ok_or("truncated pickle")?;
        let text = String::from_utf8(rest[..len].to_vec()).map_err(|e| e.to_string())?;
        self.pos += len + 1;
        Ok(text)
    }

    fn string(&mut self, n: usize) -> PickleResult<Value> {
        let bytes = self.take(n)?;
        Ok(Value::Str(String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())?))
    }

    fn pop(&mut self) -> PickleResult<Value> {
        self.stack.pop().ok_or_else(|| "stack underflow".to_string())
    }

    fn top(&mut self) -> PickleResult<&mut Value> {
        self.stack.last_mut().ok_or_else(|| "stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> PickleResult<Vec<Value>> {
        let mark =
            self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("missing MARK")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_get(&self, index: u64) -> PickleResult<Value> {
        let index = u32::try_from(index).map_err(|_| "memo index out of range")?;
        self.memo.get(&index).cloned().ok_or_else(|| format!("memo {index} is empty"))
    }

    fn memo_put(&mut self, index: u64) -> PickleResult<()> {
        let index = u32::try_from(index).map_err(|_| "memo index out of range")?;
        let value = self.stack.last().cloned().ok_or("stack underflow")?;
        self.memo.insert(index, value);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> PickleResult<()> {
        if items.len() % 2 != 0 {
            return Err("odd number of items for SETITEMS".into());
        }
        let Value::Dict(dict) = self.top()? else {
            return Err("SETITEMS on a non-dict".into());
        };
        let mut items = items.into_iter();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            match dict
                .iter_mut()
                .find(|(k, _)| matches!((k, &key), (Value::Str(a), Value::Str(b)) if a == b))
            {
                Some(slot) => slot.1 = value,
                None => dict.push((key, value)),
            }
        }
        Ok(())
    }

    fn global(&mut self, name: String) -> PickleResult<Value> {
        if ALLOWED_GLOBALS.contains(&name.as_str()) || storage_kind(&name).is_some() {
            Ok(Value::Global(name))
        } else {
            Err(format!("refusing global {name:?}: a state dict holds only tensors"))
        }
    }

    fn reduce(callable: Value, args: Value) -> PickleResult<Value> {
        let (Value::Global(name), Value::Tuple(args)) = (&callable, args) else {
            return Err(format!("REDUCE of a {} is not allowed", callable.type_name()));
        };
        match (name.as_str(), args.as_slice()) {
            ("collections.OrderedDict", []) => Ok(Value::Dict(Vec::new())),
            (
                "torch._utils._rebuild_tensor_v2",
                [Value::Storage(storage), Value::Int(offset), size, stride, ..],
            ) => Ok(Value::Tensor(TensorSpec {
                storage: storage.clone(),
                offset: *offset,
                size: int_tuple(size)?,
                stride: int_tuple(stride)?,
            })),
            ("torch._utils._rebuild_parameter", [tensor @ Value::Tensor(_), ..]) => {
                Ok(tensor.clone())
            }
            (name, _) => Err(format!("unexpected arguments for {name}")),
        }
    }

    fn persistent_load(pid: Value) -> PickleResult<Value> {
        match pid {
            Value::Tuple(items) => match items.as_slice() {
                [Value::Str(tag), Value::Global(kind), Value::Str(key), Value::Str(_), Value::Int(numel)]
                    if tag == "storage" && *numel >= 0 =>
                {
                    let kind =
                        storage_kind(kind).ok_or_else(|| format!("unknown storage {kind}"))?;
                    Ok(Value::Storage(StorageRef { kind, key: key.clone(), numel: *numel }))
                }
                _ => Err("persistent id is not a storage reference".into()),
            },
            other => Err(format!("persistent id is a {}, not a tuple", other.type_name())),
        }
    }

    /// Runs the pickle to its STOP and returns the object it built.
    fn run(mut self) -> PickleResult<Value> {
        loop {
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    self.take(1)?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Bool),
                b'K' => {
                    let n = self.uint(1)? as i64;
                    self.stack.push(Value::Int(n));
                }
                b'M' => {
                    let n = self.uint(2)? as i64;
                    self.stack.push(Value::Int(n));
                }
                b'J' => {
                    let n = self.uint(4)? as u32 as i32;
                    self.stack.push(Value::Int(i64::from(n)));
                }
                0x8a => {
                    let n = self.uint(1)? as usize;
                    if n > 8 {
                        return Err("integer too large".into());
                    }
                    let bytes = self.take(n)?;
                    let mut value =
                        bytes.iter().rev().fold(0i64, |acc, &b| (acc << 8) | i64::from(b));
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        value -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(value));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let n = self.uint(4)? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8c => {
                    let n = self.uint(1)? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8d => {
                    let n = usize::try_from(self.uint(8)?).map_err(|e| e.to_string())?;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n {
                        return Err("stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items));
                }
                b']' => self.stack.push(Value::List(Vec::new())),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b'a' => {
                    let item = self.pop()?;
                    let Value::List(list) = self.top()? else {
                        return Err("APPEND to a non-list".into());
                    };
                    list.push(item);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let Value::List(list) = self.top()? else {
                        return Err("APPENDS to a non-list".into());
                    };
                    list.extend(items);
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.set_items(vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
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
                    let value = self.memo_get(index)?;
                    self.stack.push(value);
                }
                b'j' => {
                    let index = self.uint(4)?;
                    let value = self.memo_get(index)?;
                    self.stack.push(value);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let global = self.global(format!("{module}.{name}"))?;
                    self.stack.push(global);
                }
                0x93 => {
                    let (Value::Str(name), Value::Str(module)) = (self.pop()?, self.pop()?) else {
                        return Err("STACK_GLOBAL needs two strings".into());
                    };
                    let global = self.global(format!("{module}.{name}"))?;
                    self.stack.push(global);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(Self::reduce(callable, args)?);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(Self::persistent_load(pid)?);
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict is its `_metadata` attribute; dropped.
                    let _state = self.pop()?;
                    if !matches!(self.top()?, Value::Dict(_)) {
                        return Err("BUILD is only allowed on a dict".into());
                    }
                }
                op => return Err(format!("pickle opcode 0x{op:02x} is not part of a state dict")),
            }
        }
    }
}

fn int_tuple(value: &Value) -> PickleResult<Vec<i64>> {
    let Value::Tuple(items) = value else {
        return Err(format!("expected a tuple, got a {}", value.type_name()));
    };
    items
        .iter()
        .map(|item| match item {
            Value::Int(n) => Ok(*n),
            other => Err(format!("expected an int, got a {}", other.type_name())),
        })
        .collect()
}
