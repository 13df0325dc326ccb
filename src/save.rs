//! Writing a [`StateDict`] for PyTorch: safetensors, or the zip archive that `torch.save`
//! writes, which `torch.load(path, weights_only=True)` reads (see [`StateDict::save`]).
//!
//! The `.pt` archive mirrors `torch.save(OrderedDict(...))` of PyTorch 2.11: one folder
//! `archive/` holding `data.pkl` (a protocol-2 pickle of a `collections.OrderedDict` whose values
//! are `torch._utils._rebuild_tensor_v2(persistent_id, 0, size, stride, False, OrderedDict())`,
//! opcode for opcode and memo slot for memo slot what Python's pickler writes for it),
//! `byteorder` (`little`), `data/<n>` (each tensor's bytes, little-endian, its own storage,
//! stored uncompressed at a 64-byte aligned offset), `version` (`3`), and, when the state carries
//! metadata, [`METADATA_ENTRY`] (a JSON object of strings). It leaves out `.format_version`:
//! that record tells `torch.load` that it may compute storage offsets from the layout of
//! PyTorch's own zip writer (data descriptors after each entry), which this archive does not
//! follow, so `torch.load` reads each entry's offset from the archive instead.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Device, Kind, Tensor};
use zip::write::FileOptions;
use zip::{CompressionMethod, ZipWriter};

use crate::checkpoint::{StateDict, METADATA_ENTRY};
use crate::error::{MixError, Result};

/// How much of a tensor is copied to the CPU and written at a time (4 MiB).
const CHUNK_BYTES: usize = 4 << 20;

/// The alignment of each storage in a `.pt` archive, as `torch.save` aligns them.
const STORAGE_ALIGNMENT: u16 = 64;

/// The top-level folder of a `.pt` archive: what `torch.save` names it when it writes to a
/// file object (as swak's `Checkpoint` does).
const ARCHIVE: &str = "archive";

/// The two file formats, told by the extension.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Safetensors,
    Torch,
}

impl Format {
    fn of(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Ok(Self::Safetensors),
            Some("pt" | "pth") => Ok(Self::Torch),
            _ => Err(MixError::Format {
                path: path.display().to_string(),
                reason: "unknown extension: the format is told by it, .safetensors for \
                         safetensors, .pt or .pth for torch.save's zip archive"
                    .to_string(),
            }),
        }
    }
}

/// One tensor to write: its key, dtype, shape and byte count, checked before anything is
/// written.
struct Planned<'a> {
    key: &'a str,
    tensor: &'a Tensor,
    kind: Kind,
    shape: Vec<i64>,
    bytes: u64,
}

/// The names of a dtype in safetensors and in `torch.save`'s storage types.
fn dtype_names(kind: Kind) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        Kind::Bool => ("BOOL", "BoolStorage"),
        Kind::Uint8 => ("U8", "ByteStorage"),
        Kind::Int8 => ("I8", "CharStorage"),
        Kind::Int16 => ("I16", "ShortStorage"),
        Kind::Int => ("I32", "IntStorage"),
        Kind::Int64 => ("I64", "LongStorage"),
        Kind::Half => ("F16", "HalfStorage"),
        Kind::BFloat16 => ("BF16", "BFloat16Storage"),
        Kind::Float => ("F32", "FloatStorage"),
        Kind::Double => ("F64", "DoubleStorage"),
        _ => return None,
    })
}

/// [`StateDict::save`].
pub(crate) fn save(state: &StateDict, path: &Path) -> Result<()> {
    let format = Format::of(path)?;
    let bad = |reason: String| MixError::Format { path: path.display().to_string(), reason };
    if cfg!(target_endian = "big") {
        return Err(bad("writing on a big-endian machine is not supported".into()));
    }
    let mut planned = Vec::with_capacity(state.len());
    let mut seen = std::collections::HashSet::new();
    for (key, tensor) in state.iter() {
        if !seen.insert(key) {
            return Err(bad(format!("key {key:?} appears twice in the state dict")));
        }
        let kind = tensor.f_kind()?;
        if dtype_names(kind).is_none() {
            return Err(bad(format!("{key:?}: dtype {kind:?} cannot be saved")));
        }
        let shape = tensor.size();
        let bytes = (tensor.numel() as u64).checked_mul(kind.elt_size_in_bytes() as u64);
        let bytes = bytes.ok_or_else(|| bad(format!("{key:?}: byte count overflows")))?;
        planned.push(Planned { key, tensor, kind, shape, bytes });
    }
    write_atomically(path, |file| match format {
        Format::Safetensors => write_safetensors(file, &planned, state),
        Format::Torch => write_torch_zip(file, &planned, state),
    })
}

/// A temporary file that is removed when dropped, unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    renamed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `path` atomically: `write` fills a new temporary file in the same folder, which is
/// synced to disk and renamed to `path`. On any error (or a panic in `write`) the temporary
/// file is removed, and `path` is left as it was.
fn write_atomically(path: &Path, write: impl FnOnce(File) -> Result<File>) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io_error = |at: &Path, source| MixError::Io { path: at.display().to_string(), source };
    let name = path.file_name().ok_or_else(|| MixError::Format {
        path: path.display().to_string(),
        reason: "not a file name".to_string(),
    })?;
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    let (temp, file) = loop {
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        temp_name.push(format!(".tch-mix-{}-{n}.tmp", std::process::id()));
        let temp = folder.join(temp_name);
        match OpenOptions::new().write(true).create_new(true).open(&temp) {
            Ok(file) => break (TempFile { path: temp, renamed: false }, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error(&temp, e)),
        }
    };
    let file = write(file).map_err(|e| match e {
        MixError::Io { source, .. } => io_error(path, source),
        other => other,
    })?;
    file.sync_all().map_err(|e| io_error(&temp.path, e))?;
    drop(file);
    fs::rename(&temp.path, path).map_err(|e| io_error(path, e))?;
    let mut temp = temp;
    temp.renamed = true;
    // The rename itself reaches the disk with the folder's entry; where a folder cannot be
    // opened or synced (some file systems), the file is in place all the same.
    if let Ok(folder) = File::open(folder) {
        let _ = folder.sync_all();
    }
    Ok(())
}

/// Writes `tensor`'s elements, little-endian, row-major, copied to the CPU `CHUNK_BYTES` at a
/// time (a non-contiguous tensor is made contiguous on its device first).
fn write_tensor(out: &mut impl Write, tensor: &Tensor, buffer: &mut Vec<u8>) -> Result<()> {
    let flat = tch::no_grad(|| tensor.f_detach()?.f_contiguous()?.f_reshape([-1]))?;
    let numel = flat.size()[0];
    let element = flat.f_kind()?.elt_size_in_bytes();
    let per_chunk = (CHUNK_BYTES / element).max(1) as i64;
    let mut start = 0;
    while start < numel {
        let len = per_chunk.min(numel - start);
        let part = flat.f_narrow(0, start, len)?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let bytes = len as usize * element;
        buffer.resize(bytes, 0);
        part.f_copy_data_u8(&mut buffer[..bytes], len as usize)?;
        out.write_all(&buffer[..bytes]).map_err(write_error)?;
        start += len;
    }
    Ok(())
}

/// A JSON string literal.
pub(crate) fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The metadata as a JSON object of strings.
fn metadata_json(state: &StateDict) -> String {
    let items: Vec<String> = state
        .metadata()
        .iter()
        .map(|(key, value)| format!("{}:{}", json_string(key), json_string(value)))
        .collect();
    format!("{{{}}}", items.join(","))
}

/// An error of the writers, whose path [`write_atomically`] fills in.
fn write_error(source: std::io::Error) -> MixError {
    MixError::Io { path: String::new(), source }
}

/// Writes safetensors: the header (tensors ordered by element size, largest first, then by
/// key, so that each lies at a multiple of its element size; `__metadata__` if there is any),
/// padded with spaces to a multiple of 8 bytes, then each tensor's bytes.
fn write_safetensors(file: File, planned: &[Planned], state: &StateDict) -> Result<File> {
    let mut order: Vec<&Planned> = planned.iter().collect();
    order.sort_by(|a, b| {
        let size = |p: &Planned| p.kind.elt_size_in_bytes();
        size(b).cmp(&size(a)).then(a.key.cmp(b.key))
    });
    let mut fields = Vec::with_capacity(order.len() + 1);
    if !state.metadata().is_empty() {
        fields.push(format!("\"__metadata__\":{}", metadata_json(state)));
    }
    let mut offset = 0u64;
    for p in &order {
        let (dtype, _) = dtype_names(p.kind).expect("checked in save");
        let shape: Vec<String> = p.shape.iter().map(i64::to_string).collect();
        fields.push(format!(
            "{}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            json_string(p.key),
            shape.join(","),
            offset + p.bytes
        ));
        offset += p.bytes;
    }
    let mut header = format!("{{{}}}", fields.join(",")).into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(write_error)?;
    out.write_all(&header).map_err(write_error)?;
    let mut buffer = Vec::new();
    for p in &order {
        write_tensor(&mut out, p.tensor, &mut buffer)?;
    }
    out.into_inner().map_err(|e| write_error(e.into_error()))
}

/// Writes `torch.save`'s zip archive (see the module's documentation).
fn write_torch_zip(file: File, planned: &[Planned], state: &StateDict) -> Result<File> {
    let zip_error = |e: zip::result::ZipError| match e {
        zip::result::ZipError::Io(e) => write_error(e),
        other => write_error(std::io::Error::other(other.to_string())),
    };
    let stored = FileOptions::default().compression_method(CompressionMethod::Stored);
    let mut zip = ZipWriter::new(BufWriter::with_capacity(1 << 20, file));
    let entry = |zip: &mut ZipWriter<_>, name: &str, data: &[u8]| -> Result<()> {
        zip.start_file(format!("{ARCHIVE}/{name}"), stored).map_err(zip_error)?;
        zip.write_all(data).map_err(write_error)
    };
    entry(&mut zip, "data.pkl", &state_dict_pickle(planned))?;
    entry(&mut zip, "byteorder", b"little")?;
    let mut buffer = Vec::new();
    for (n, p) in planned.iter().enumerate() {
        let options = stored.large_file(p.bytes >= u64::from(u32::MAX));
        zip.start_file_aligned(format!("{ARCHIVE}/data/{n}"), options, STORAGE_ALIGNMENT)
            .map_err(zip_error)?;
        write_tensor(&mut zip, p.tensor, &mut buffer)?;
    }
    entry(&mut zip, "version", b"3\n")?;
    if !state.metadata().is_empty() {
        entry(&mut zip, METADATA_ENTRY, metadata_json(state).as_bytes())?;
    }
    let out = zip.finish().map_err(zip_error)?;
    out.into_inner().map_err(|e| write_error(e.into_error()))
}

/// What Python's pickler (protocol 2) writes, with its memo: every string, global and
/// non-empty tuple is put in the memo when first written, and a string or global written again
/// is fetched from it.
struct Pickler {
    out: Vec<u8>,
    next: u32,
    /// Memo slots of what is written more than once: globals, `'storage'`, `'cpu'`.
    slots: std::collections::HashMap<String, u32>,
}

impl Pickler {
    fn new() -> Self {
        Self { out: vec![0x80, 2], next: 0, slots: Default::default() }
    }

    /// BINPUT or LONG_BINPUT of the next slot.
    fn put(&mut self) -> u32 {
        let slot = self.next;
        match u8::try_from(slot) {
            Ok(slot) => self.out.extend([b'q', slot]),
            Err(_) => {
                self.out.push(b'r');
                self.out.extend(slot.to_le_bytes());
            }
        }
        self.next += 1;
        slot
    }

    /// BINGET or LONG_BINGET.
    fn get(&mut self, slot: u32) {
        match u8::try_from(slot) {
            Ok(slot) => self.out.extend([b'h', slot]),
            Err(_) => {
                self.out.push(b'j');
                self.out.extend(slot.to_le_bytes());
            }
        }
    }

    /// Writes `key`'s value with `write` and memoizes it the first time, fetches it after.
    fn shared(&mut self, key: String, write: impl FnOnce(&mut Self)) {
        match self.slots.get(&key) {
            Some(&slot) => self.get(slot),
            None => {
                write(self);
                let slot = self.put();
                self.slots.insert(key, slot);
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        self.shared(format!("global {module}.{name}"), |p| {
            p.out.push(b'c');
            p.out.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        });
    }

    /// BINUNICODE, memoized.
    fn string(&mut self, text: &str) {
        self.out.push(b'X');
        self.out.extend((text.len() as u32).to_le_bytes());
        self.out.extend_from_slice(text.as_bytes());
        self.put();
    }

    /// A string that recurs (one Python object): memoized once, fetched after.
    fn shared_string(&mut self, text: &str) {
        self.shared(format!("str {text}"), |p| {
            p.out.push(b'X');
            p.out.extend((text.len() as u32).to_le_bytes());
            p.out.extend_from_slice(text.as_bytes());
        });
    }

    /// BININT1, BININT2, BININT or LONG1, as Python picks them.
    fn int(&mut self, n: i64) {
        if (0..=0xff).contains(&n) {
            self.out.extend([b'K', n as u8]);
        } else if (0..=0xffff).contains(&n) {
            self.out.push(b'M');
            self.out.extend((n as u16).to_le_bytes());
        } else if i32::try_from(n).is_ok() {
            self.out.push(b'J');
            self.out.extend((n as i32).to_le_bytes());
        } else {
            // The shortest two's complement that keeps the sign: bit length / 8 + 1 bytes.
            let bits = 64 - if n < 0 { (!n).leading_zeros() } else { n.leading_zeros() };
            let len = (bits / 8 + 1).min(8) as usize;
            self.out.extend([0x8a, len as u8]);
            self.out.extend_from_slice(&n.to_le_bytes()[..len]);
        }
    }

    /// A tuple of ints: EMPTY_TUPLE, TUPLE1-3, or MARK ... TUPLE; memoized unless empty.
    fn int_tuple(&mut self, items: &[i64]) {
        if items.is_empty() {
            self.out.push(b')');
            return;
        }
        if items.len() > 3 {
            self.out.push(b'(');
        }
        for &n in items {
            self.int(n);
        }
        self.out.push(match items.len() {
            1 => 0x85,
            2 => 0x86,
            3 => 0x87,
            _ => b't',
        });
        self.put();
    }
}

/// The strides of a contiguous tensor of `shape`.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

/// `data.pkl` for the planned tensors, each in its own storage `<n>`: what
/// `torch.save(OrderedDict(...))` writes (items in batches of 1,000 per SETITEMS, one alone with
/// SETITEM, as Python's pickler batches them).
fn state_dict_pickle(planned: &[Planned]) -> Vec<u8> {
    let mut p = Pickler::new();
    p.global("collections", "OrderedDict");
    let ordered_dict = p.slots["global collections.OrderedDict"];
    p.out.push(b')');
    p.out.push(b'R');
    p.put();
    let mut numbered = planned.iter().enumerate().peekable();
    while numbered.peek().is_some() {
        let batch: Vec<_> = numbered.by_ref().take(1000).collect();
        if batch.len() > 1 {
            p.out.push(b'(');
        }
        for &(n, item) in &batch {
            let (_, storage) = dtype_names(item.kind).expect("checked in save");
            p.string(item.key);
            p.global("torch._utils", "_rebuild_tensor_v2");
            p.out.push(b'(');
            // The persistent id: ('storage', torch.<Kind>Storage, '<n>', 'cpu', numel).
            p.out.push(b'(');
            p.shared_string("storage");
            p.global("torch", storage);
            p.string(&n.to_string());
            p.shared_string("cpu");
            p.int(item.shape.iter().product());
            p.out.push(b't');
            p.put();
            p.out.push(b'Q');
            p.int(0);
            p.int_tuple(&item.shape);
            p.int_tuple(&contiguous_strides(&item.shape));
            p.out.push(0x89); // requires_grad = False
            p.get(ordered_dict); // backward hooks: OrderedDict()
            p.out.extend([b')', b'R']);
            p.put();
            p.out.push(b't');
            p.put();
            p.out.push(b'R');
            p.put();
        }
        p.out.push(if batch.len() > 1 { b'u' } else { b's' });
    }
    p.out.push(b'.');
    p.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_are_written_as_python_writes_them() {
        let cases: [(i64, &[u8]); 7] = [
            (0, b"K\x00"),
            (255, b"K\xff"),
            (256, b"M\x00\x01"),
            (65536, b"J\x00\x00\x01\x00"),
            (i64::from(i32::MAX), b"J\xff\xff\xff\x7f"),
            (1 << 31, b"\x8a\x05\x00\x00\x00\x80\x00"),
            (i64::MAX, b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f"),
        ];
        for (n, expected) in cases {
            let mut p = Pickler::new();
            p.out.clear();
            p.int(n);
            assert_eq!(p.out, expected, "{n}");
        }
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), [12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<i64>::new());
        assert_eq!(contiguous_strides(&[3, 0, 2]), [2, 2, 1]);
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}é"), "\"a\\\"b\\\\c\\nd\\u0001é\"");
    }
}
