//! The pickle of a `torch.save` archive, read without executing it: values are small handles
//! into flat tables, nothing recursive, every count bounded.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::torch_zip::storage_kind;

use super::*;

/// The callables and types a state-dict pickle may name with GLOBAL.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Global {
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
    pub(super) fn new(module: &str, name: &str) -> Option<Self> {
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
pub(super) enum Value {
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
    pub(super) fn type_name(&self) -> &'static str {
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
pub(super) struct StorageRef {
    kind: Kind,
    /// Index into `Pickled::strs`.
    key: u32,
    numel: i64,
}

/// The arguments of `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, with
/// size and stride as tuples of ints of the same length (checked when it was built).
#[derive(Debug, Clone, Copy)]
pub(super) struct TensorRef {
    /// Index into `Pickled::storages`.
    storage: u32,
    offset: i64,
    /// Index into `Pickled::tuples`.
    size: u32,
    /// Index into `Pickled::tuples`.
    stride: u32,
}

/// What a pickle built: flat tables that [`Value`]s index into, and the root object.
pub(super) struct Pickled<'a> {
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

pub(super) type PickleResult<T> = std::result::Result<T, String>;

impl<'a> Pickled<'a> {
    pub(super) fn str(&self, index: u32) -> &'a str {
        let (start, end) = self.strs[index as usize];
        std::str::from_utf8(&self.data[start as usize..end as usize]).expect("checked when read")
    }

    pub(super) fn tuple(&self, index: u32) -> &[Value] {
        let (start, end) = self.tuples[index as usize];
        &self.tuple_items[start as usize..end as usize]
    }

    pub(super) fn int(&self, value: Value) -> Option<i64> {
        match value {
            Value::Int(n) => Some(i64::from(n)),
            Value::Long(i) => Some(self.longs[i as usize]),
            _ => None,
        }
    }

    pub(super) fn ints(&self, tuple: u32) -> Vec<i64> {
        self.tuple(tuple).iter().map(|&v| self.int(v).expect("checked when built")).collect()
    }

    /// The state dict at `key` (see [`StateDict::from_file_key`]), or by default the pickled
    /// object if it is a state dict, else its `model` entry; owned, so that the pickle and its
    /// tables can go before any storage is read.
    pub(super) fn select(&self, key: Option<&str>) -> PickleResult<Selected> {
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
    pub(super) fn default_items(&self) -> PickleResult<Vec<(&'a str, TensorRef)>> {
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
    pub(super) fn lookup(&self, path: &str) -> PickleResult<Value> {
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
    pub(super) fn child(&self, value: Value, segment: &str) -> Option<Value> {
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
    pub(super) fn entries_of(&self, value: Value) -> String {
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
    pub(super) fn state_items(
        &self,
        value: Value,
        what: &str,
    ) -> PickleResult<Vec<(&'a str, TensorRef)>> {
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
    pub(super) fn specs(&self, items: Vec<(&str, TensorRef)>) -> Vec<TensorSpec> {
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
pub(super) fn a(type_name: &str) -> String {
    let article = if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {type_name}")
}

/// The state dict that [`Pickled::select`] found.
pub(super) struct Selected {
    pub(super) tensors: Vec<TensorSpec>,
    /// Whether it is the one that [`StateDict::from_file`] reads, which a file's metadata
    /// describes.
    pub(super) is_default: bool,
}

/// One tensor of a state dict as its pickle describes it: a view of a storage.
#[derive(Debug)]
pub(super) struct TensorSpec {
    pub(super) key: String,
    /// The storage's key: its data is `<top>/data/<storage>`.
    pub(super) storage: String,
    /// The storage's dtype and element count.
    pub(super) kind: Kind,
    pub(super) numel: i64,
    pub(super) offset: i64,
    pub(super) size: Vec<i64>,
    pub(super) stride: Vec<i64>,
}

impl TensorSpec {
    /// The tensor as a view of its storage `base`, bounds checked first: nothing is copied.
    pub(super) fn view(&self, base: &Tensor) -> PickleResult<Tensor> {
        check_view(self.offset, &self.size, &self.stride, self.numel)?;
        base.f_as_strided(&self.size, &self.stride, Some(self.offset)).map_err(|e| e.to_string())
    }
}

/// Checks that a view `(offset, size, stride)` lies inside a storage of `numel` elements, in
/// checked arithmetic, naming the field that is wrong.
pub(super) fn check_view(
    offset: i64,
    size: &[i64],
    stride: &[i64],
    numel: i64,
) -> PickleResult<()> {
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
pub(super) struct Unpickler<'a> {
    out: Pickled<'a>,
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK (Python's metastack): items below the last mark are out of
    /// reach until it is popped.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
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

    pub(super) fn take(&mut self, n: usize) -> PickleResult<&'a [u8]> {
        let data = self.out.data;
        let end = self.pos.checked_add(n).filter(|&end| end <= data.len());
        let end = end.ok_or_else(|| "truncated pickle".to_string())?;
        let bytes = &data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    pub(super) fn uint(&mut self, n: usize) -> PickleResult<u64> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    pub(super) fn len(&mut self, n: usize) -> PickleResult<usize> {
        usize::try_from(self.uint(n)?).map_err(|_| "length out of range".to_string())
    }

    pub(super) fn line(&mut self) -> PickleResult<&'a str> {
        let rest = &self.out.data[self.pos..];
        let len = rest.iter().position(|&b| b == b'\n').ok_or("truncated pickle")?;
        self.pos += len + 1;
        std::str::from_utf8(&rest[..len]).map_err(|e| e.to_string())
    }

    pub(super) fn push(&mut self, value: Value) {
        self.stack.push(value);
    }

    pub(super) fn push_int(&mut self, n: i64) -> PickleResult<()> {
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

    pub(super) fn push_str(&mut self, n: usize) -> PickleResult<()> {
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
    pub(super) fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    pub(super) fn pop(&mut self) -> PickleResult<Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    pub(super) fn top(&self) -> PickleResult<Value> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    /// Pops the last mark; the items above it stay on the stack, from the returned position.
    pub(super) fn pop_mark(&mut self) -> PickleResult<usize> {
        self.marks.pop().ok_or_else(|| "missing MARK".to_string())
    }

    pub(super) fn tuple_from(&mut self, start: usize) -> PickleResult<Value> {
        let value = Value::Tuple(index(self.out.tuples.len())?);
        let from = index(self.out.tuple_items.len())?;
        self.out.tuple_items.extend(self.stack.drain(start..));
        self.out.tuples.push((from, index(self.out.tuple_items.len())?));
        Ok(value)
    }

    /// Sets the `(key, value)` pairs `stack[start..]` on the dict below them.
    pub(super) fn set_items(&mut self, start: usize) -> PickleResult<()> {
        if !(self.stack.len() - start).is_multiple_of(2) {
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

    pub(super) fn memo_put(&mut self, index: u64) -> PickleResult<()> {
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

    pub(super) fn memo_get(&mut self, index: u64) -> PickleResult<()> {
        let value = u32::try_from(index).ok().and_then(|i| self.memo.get(&i).copied());
        let value = value.ok_or_else(|| format!("memo {index} is empty"))?;
        self.push(value);
        Ok(())
    }

    pub(super) fn global(&mut self, module: &str, name: &str) -> PickleResult<()> {
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

    pub(super) fn new_dict(&mut self) -> PickleResult<Value> {
        let dict = Value::Dict(self.out.dicts);
        self.out.dicts = self.out.dicts.checked_add(1).ok_or("too many dicts")?;
        Ok(dict)
    }

    pub(super) fn reduce(&mut self, callable: Value, args: Value) -> PickleResult<Value> {
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

    pub(super) fn persistent_load(&mut self, pid: Value) -> PickleResult<Value> {
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
    pub(super) fn run(mut self) -> PickleResult<Pickled<'a>> {
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
pub(super) fn index(n: usize) -> PickleResult<u32> {
    u32::try_from(n).map_err(|_| "pickle too large".to_string())
}

/// At most 100 characters of a name from the file, for an error message.
pub(super) fn shorten(text: &str) -> String {
    match text.char_indices().nth(100) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}
