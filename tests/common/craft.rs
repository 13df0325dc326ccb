//! Crafted weight files, made at test time: a pickle writer for the opcodes `torch.save` uses
//! (and any others), a zip writer that stores entries exactly as told (duplicate names, any
//! compression method, any declared size), and a deflate stream of zeros. The hostile-input and
//! fuzz tests build their files with these, so no malformed binary is committed.

use std::path::PathBuf;

/// A pickle under construction, protocol 2 like `torch.save`'s.
pub struct Pickle(pub Vec<u8>);

impl Default for Pickle {
    fn default() -> Self {
        Self::new()
    }
}

impl Pickle {
    /// PROTO 2.
    pub fn new() -> Self {
        Self(vec![0x80, 2])
    }

    /// Any opcode byte(s), as given.
    pub fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn mark(&mut self) -> &mut Self {
        self.op(b"(")
    }

    pub fn none(&mut self) -> &mut Self {
        self.op(b"N")
    }

    /// BININT1, BININT2, BININT or LONG1, whichever holds `n`.
    pub fn int(&mut self, n: i64) -> &mut Self {
        if (0..256).contains(&n) {
            self.op(&[b'K', n as u8])
        } else if (0..65536).contains(&n) {
            self.op(b"M").op(&(n as u16).to_le_bytes())
        } else if i32::try_from(n).is_ok() {
            self.op(b"J").op(&(n as i32).to_le_bytes())
        } else {
            self.op(&[0x8a, 8]).op(&n.to_le_bytes())
        }
    }

    /// BINUNICODE.
    pub fn str(&mut self, text: &str) -> &mut Self {
        self.op(b"X").op(&(text.len() as u32).to_le_bytes()).op(text.as_bytes())
    }

    /// GLOBAL `module.name`.
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b"c").op(module.as_bytes()).op(b"\n").op(name.as_bytes()).op(b"\n")
    }

    /// LONG_BINPUT.
    pub fn put(&mut self, index: u32) -> &mut Self {
        self.op(b"r").op(&index.to_le_bytes())
    }

    /// LONG_BINGET.
    pub fn get(&mut self, index: u32) -> &mut Self {
        self.op(b"j").op(&index.to_le_bytes())
    }

    /// An empty `collections.OrderedDict`, as `torch.save` builds a state dict.
    pub fn ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b")R")
    }

    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`
    /// with the storage `('storage', torch.<storage_type>, key, 'cpu', numel)`.
    pub fn tensor(&mut self, t: &TensorDef) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").mark();
        self.mark().str("storage").global("torch", t.storage_type).str(&t.storage);
        self.str("cpu").int(t.numel).op(b"tQ");
        self.int(t.offset).mark();
        for &n in &t.size {
            self.int(n);
        }
        self.op(b"t").mark();
        for &s in &t.stride {
            self.int(s);
        }
        self.op(b"t").op(&[0x89]).ordered_dict().op(b"tR")
    }

    pub fn stop(&mut self) -> Vec<u8> {
        self.op(b".");
        std::mem::take(&mut self.0)
    }
}

/// One tensor of a crafted state dict.
#[derive(Debug, Clone)]
pub struct TensorDef {
    pub key: String,
    /// `FloatStorage`, `LongStorage`, ...
    pub storage_type: &'static str,
    /// The storage's key: its data is `archive/data/<storage>`.
    pub storage: String,
    /// The storage's declared element count.
    pub numel: i64,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

impl TensorDef {
    /// A contiguous f32 tensor of its own storage `key`.
    pub fn float(key: &str, storage: &str, size: &[i64]) -> Self {
        let mut stride = vec![1; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1];
        }
        Self {
            key: key.into(),
            storage_type: "FloatStorage",
            storage: storage.into(),
            numel: size.iter().product(),
            offset: 0,
            size: size.to_vec(),
            stride,
        }
    }
}

/// The pickle `torch.save(OrderedDict(tensors))` would write (without memo entries).
pub fn state_dict_pickle(tensors: &[TensorDef]) -> Vec<u8> {
    let mut p = Pickle::new();
    p.ordered_dict().mark();
    for t in tensors {
        p.str(&t.key).tensor(t);
    }
    p.op(b"u").stop()
}

/// One entry of a crafted zip archive.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    /// The bytes stored, compressed or not.
    pub data: Vec<u8>,
    /// 0 stored, 8 deflated, 12 bzip2, ...
    pub method: u16,
    /// The uncompressed size declared in the headers.
    pub size: u32,
    pub crc: u32,
}

impl Entry {
    /// A stored entry with its true size and CRC.
    pub fn stored(name: &str, data: &[u8]) -> Self {
        let size = data.len() as u32;
        Self { name: name.into(), data: data.to_vec(), method: 0, size, crc: crc32(data) }
    }
}

/// A zip archive of `entries`, in order, exactly as given.
pub fn zip(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for e in entries {
        let offset = out.len() as u32;
        let fields = |out: &mut Vec<u8>| {
            out.extend_from_slice(&20u16.to_le_bytes()); // version needed
            out.extend_from_slice(&0u16.to_le_bytes()); // flags
            out.extend_from_slice(&e.method.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes()); // time
            out.extend_from_slice(&0x21u16.to_le_bytes()); // date: 1980-01-01
            out.extend_from_slice(&e.crc.to_le_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.size.to_le_bytes());
            out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes()); // extra field length
        };
        out.extend_from_slice(b"PK\x03\x04");
        fields(&mut out);
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&e.data);
        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        fields(&mut central);
        central.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(e.name.as_bytes());
    }
    let directory_at = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    out.extend_from_slice(&[0; 4]); // disk numbers
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&directory_at.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // comment length
    out
}

/// A `torch.save`-shaped archive: `archive/data.pkl`, `archive/byteorder` and one stored
/// `archive/data/<key>` per storage.
pub fn torch_zip(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries = vec![Entry::stored("archive/data.pkl", pickle)];
    entries.push(Entry::stored("archive/byteorder", b"little"));
    for (key, data) in storages {
        entries.push(Entry::stored(&format!("archive/data/{key}"), data));
    }
    zip(&entries)
}

/// Little-endian f32 bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// CRC-32 as zip uses it (bitwise; for small entries).
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A raw deflate stream that inflates to `n` zero bytes: one block of fixed Huffman codes, a
/// literal zero, then copies of 258 bytes at distance 1 (13 bits each: ~160 times smaller).
pub fn deflate_zeros(n: u64) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        len: u32,
    }
    impl Bits {
        /// `count` bits of `value`, least significant first.
        fn put(&mut self, value: u64, count: u32) {
            self.acc |= value << self.len;
            self.len += count;
            while self.len >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.len -= 8;
            }
        }
        /// A Huffman code of `count` bits, most significant first.
        fn code(&mut self, code: u64, count: u32) {
            let reversed = (0..count).fold(0, |acc, i| (acc << 1) | ((code >> i) & 1));
            self.put(reversed, count);
        }
    }
    let mut bits = Bits { out: Vec::with_capacity((n / 158) as usize + 16), acc: 0, len: 0 };
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE 01: fixed codes
    let literal_zero = |bits: &mut Bits| bits.code(0x30, 8);
    if n > 0 {
        literal_zero(&mut bits);
    }
    let rest = n.saturating_sub(1);
    for _ in 0..rest / 258 {
        bits.code(0xc5, 8); // length 258: symbol 285
        bits.code(0, 5); // distance 1: code 0
    }
    for _ in 0..rest % 258 {
        literal_zero(&mut bits);
    }
    bits.code(0, 7); // end of block: symbol 256
    bits.put(0, 7); // flush
    bits.out
}

/// A fresh scratch folder for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-mix-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
