//! `torch.save` zip archives: PyTorch's layout, checked end records, entries read no further than
//! their storages declare.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use tch::{Kind, Tensor};
use zip::{CompressionMethod, ZipArchive};

use super::pickle::Unpickler;
use super::*;

/// Reads a `torch.save` zip archive: `<top>/data.pkl` plus one `<top>/data/<key>` per storage,
/// and the state dict at `key` in its pickle (see [`super::pickle::Pickled::select`]).
pub(super) fn read_torch_zip(file: File, path: &Path, key: Option<&str>) -> Result<StateDict> {
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
pub(super) struct WindowedFile {
    file: File,
    len: u64,
    pos: u64,
    start: u64,
    window: Vec<u8>,
}

impl WindowedFile {
    const WINDOW: u64 = 64 << 10;

    pub(super) fn new(file: File) -> io::Result<Self> {
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
pub(super) fn check_zip_end(reader: &mut WindowedFile) -> std::result::Result<(), String> {
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
pub(super) struct TorchArchive {
    archive: ZipArchive<WindowedFile>,
    /// The top-level folder with its slash, `archive/`.
    top: String,
    file_len: u64,
}

/// What the zip reader (zip 0.6) says when an entry's data does not match its CRC-32.
const ZIP_CHECKSUM_ERROR: &str = "Invalid checksum";

impl TorchArchive {
    pub(super) fn new(
        archive: ZipArchive<WindowedFile>,
        file_len: u64,
    ) -> std::result::Result<Self, String> {
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
    pub(super) fn duplicate(mut archive: ZipArchive<WindowedFile>) -> String {
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
    pub(super) fn read_optional(
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
        let bound = limit.saturating_add(1);
        if entry.crc32() != 0 {
            entry.take(bound).read_to_end(&mut data).map_err(|e| format!("{name}: {e}"))?;
            return Ok(Some(data));
        }
        // PyTorch's writer with `compute_crc32 = False` stores a CRC-32 of 0 for every entry, and
        // torch.load checks no CRC. The zip reader checks it when a read reaches the entry's
        // end, so such an entry is read to its declared size (within the bound), and then one
        // more read tells its end (the reader's checksum error, or no byte if the CRC is right)
        // from bytes past what it declares, which are refused like any entry that lies.
        let declared = entry.size();
        let mut entry = entry.take(bound);
        (&mut entry).take(declared).read_to_end(&mut data).map_err(|e| format!("{name}: {e}"))?;
        if (data.len() as u64) < bound {
            let mut probe = [0u8; 1];
            match entry.read(&mut probe) {
                Ok(0) => {}
                Ok(_) => {
                    return Err(format!(
                        "{name}: holds more than the {declared} bytes its zip header declares"
                    ))
                }
                Err(e) if e.to_string() == ZIP_CHECKSUM_ERROR => {}
                Err(e) => return Err(format!("{name}: {e}")),
            }
        }
        Ok(Some(data))
    }

    /// Reads `<top>/<name>` as [`TorchArchive::read_optional`], which must exist.
    pub(super) fn read(&mut self, name: &str, limit: u64) -> std::result::Result<Vec<u8>, String> {
        let top = &self.top;
        let missing = format!("{top}{name} is missing");
        self.read_optional(name, limit)?.ok_or(missing)
    }

    /// The metadata in `<top>/tch_mix.json` ([`METADATA_ENTRY`]), empty without that entry.
    pub(super) fn metadata(&mut self) -> std::result::Result<BTreeMap<String, String>, String> {
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
    pub(super) fn storage(
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

pub(super) fn storage_kind(name: &str) -> Option<Kind> {
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
