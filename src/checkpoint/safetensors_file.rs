//! safetensors files: their header checked before the safetensors crate reads it, and their
//! tensors read one at a time.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use tch::{Kind, Tensor};

use super::*;

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
pub(super) fn read_safetensors_file(mut file: File, path: &Path) -> Result<SafetensorsContent> {
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
pub(super) const SAFETENSORS_MAX_HEADER: u64 = 100_000_000;

/// A safetensors header, checked: where the data begins, and each tensor's name, dtype, shape
/// and byte range within the data (sorted by name), and the `__metadata__`.
pub(super) struct SafetensorsIndex {
    data_start: usize,
    tensors: Vec<(String, Kind, Vec<i64>, std::ops::Range<usize>)>,
    metadata: HashMap<String, String>,
}

/// Reads the header of a safetensors buffer (the file's length, with at least its header),
/// checked by the safetensors crate against that length.
pub(super) fn index_safetensors(buffer: &[u8], path: &Path) -> Result<SafetensorsIndex> {
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
pub(super) fn check_safetensors_offsets(
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
