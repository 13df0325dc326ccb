//! Weight files and fixtures crafted as an attacker would: each loads, or fails with an error
//! saying what is wrong, without a panic, an abort, a deep recursion or a large allocation.
//!
//! Every file is made here at test time (tests/common/craft.rs). Loads run on a thread with a
//! 2 MiB stack, so any recursion whose depth the file controls would overflow it; memory is
//! bounded by construction (what would have been gigabytes is a view or is never read), and the
//! README's "Loading PyTorch weights" lists the limits. With `TCH_MIX_HOSTILE_OUT=DIR` the files
//! are also written to DIR, to measure them one by one (`cargo run --release --example load`).

mod common;

use std::path::{Path, PathBuf};

use common::craft::{
    crc32, deflate_zeros, f32_bytes, scratch, state_dict_pickle, torch_zip, zip, Entry, Pickle,
    TensorDef,
};
use common::{data, fixtures};
use tch::{nn, Device};
use tch_mix::checkpoint::{MAX_DIMS, MAX_TENSORS};
use tch_mix::fixture::Fixture;
use tch_mix::{GlobalWeightsMixer, MixError, Mixer, StateDict};

/// Writes `bytes` as `name` into the test's scratch folder (and into `TCH_MIX_HOSTILE_OUT`).
fn write(test: &str, name: &str, bytes: &[u8]) -> PathBuf {
    if let Some(out) = std::env::var_os("TCH_MIX_HOSTILE_OUT") {
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(Path::new(&out).join(name), bytes).unwrap();
    }
    let path = scratch(test).join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `StateDict::from_file` on a thread with a 2 MiB stack.
fn load(path: &Path) -> Result<StateDict, MixError> {
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || StateDict::from_file(path))
        .unwrap()
        .join()
        .expect("the load panicked or overflowed its stack")
}

/// Writes and loads a crafted file, which must fail with a format error; returns its message.
fn refused(test: &str, name: &str, bytes: &[u8]) -> String {
    match load(&write(test, name, bytes)) {
        Err(err @ MixError::Format { .. }) => err.to_string(),
        Err(other) => panic!("{name}: expected a format error, got {other:?}"),
        Ok(state) => panic!("{name}: expected an error, loaded {} tensors", state.len()),
    }
}

fn assert_contains(message: &str, part: &str) {
    assert!(message.contains(part), "{message:?} does not say {part:?}");
}

/// A state dict of one tensor `w` = [1, 2, 3] (storage `0`).
fn one_tensor() -> (TensorDef, Vec<u8>) {
    (TensorDef::float("w", "0", &[3]), f32_bytes(&[1.0, 2.0, 3.0]))
}

/// `ordered_dict()` `key` and the value `build` pushes, then SETITEMS and STOP, zipped with `w`'s
/// storage.
fn dict_of(key: &str, build: impl FnOnce(&mut Pickle)) -> Vec<u8> {
    let mut p = Pickle::new();
    p.ordered_dict().mark().str(key);
    build(&mut p);
    torch_zip(&p.op(b"u").stop(), &[("0", one_tensor().1)])
}

/// The value `(((None, None), (None, None)), ...)` of `doublings` levels, each a tuple of the
/// level below twice, through the memo: `N q0` then `h0 TUPLE2 q0` per level.
fn memo_bomb(p: &mut Pickle, doublings: usize) {
    p.op(b"Nq\x00");
    for _ in 0..doublings {
        p.op(b"h\x00\x86q\x00");
    }
}

#[test]
fn self_referencing_memo_is_shared_not_copied() {
    for doublings in [22, 40] {
        let bytes = dict_of("bomb", |p| memo_bomb(p, doublings));
        assert!(bytes.len() < 1024, "{} bytes", bytes.len());
        let message = refused("memo", &format!("memo-{doublings}.pt"), &bytes);
        assert_contains(&message, "\"bomb\" holds a tuple, not a tensor");
    }
    // As the dict's BUILD state (dropped, like an OrderedDict's `_metadata`) it loads.
    let (w, storage) = one_tensor();
    let mut p = Pickle::new();
    p.ordered_dict();
    memo_bomb(&mut p, 40);
    p.op(b"b").mark().str("w").tensor(&w).op(b"u");
    let state = load(&write("memo", "memo-40-state.pt", &torch_zip(&p.stop(), &[("0", storage)])));
    assert_eq!(state.unwrap().keys().collect::<Vec<_>>(), ["w"]);
}

#[test]
fn deep_nesting_needs_no_stack() {
    // Tuples 5,880 deep, each put in the memo: `N` then `TUPLE1 LONG_BINPUT i`.
    let deep_tuple = |p: &mut Pickle| {
        p.none();
        for i in 0..5880 {
            p.op(b"\x85").put(i);
        }
    };
    let message = refused("deep", "tuples-5880.pt", &dict_of("deep", deep_tuple));
    assert_contains(&message, "\"deep\" holds a tuple, not a tensor");
    // The same in the BUILD state loads.
    let (w, storage) = one_tensor();
    let mut p = Pickle::new();
    p.ordered_dict();
    deep_tuple(&mut p);
    p.op(b"b").mark().str("w").tensor(&w).op(b"u");
    let path = write("deep", "tuples-5880-state.pt", &torch_zip(&p.stop(), &[("0", storage)]));
    assert_eq!(load(&path).unwrap().len(), 1);

    // Lists a million deep: `]` a million times, then APPEND each into the one below.
    let mut p = Pickle::new();
    p.op(&[b']'; 1_000_000]).op(&[b'a'; 999_999]);
    let message = refused("deep", "lists-1m.pt", &torch_zip(&p.stop(), &[]));
    assert_contains(&message, "the pickled object is a list, not a state dict");

    // Dicts a million deep under one memoised key: `}` then `h0 }` per level, then SETITEMs.
    let mut p = Pickle::new();
    p.ordered_dict().str("k").op(b"q\x00}");
    for _ in 0..1_000_000 {
        p.op(b"h\x00}");
    }
    p.op(&[b's'; 1_000_001]);
    let message = refused("deep", "dicts-1m.pt", &torch_zip(&p.stop(), &[]));
    assert_contains(&message, "\"k\" holds a dict, not a tensor");
}

/// An OrderedDict of `n` distinct keys set in SETITEMS batches of 1,000 (as pickle writes
/// them), each value pushed by `value`.
fn many_keys(n: usize, value: &[u8]) -> Pickle {
    let mut p = Pickle::new();
    p.ordered_dict();
    for batch in (0..n).collect::<Vec<_>>().chunks(1000) {
        p.mark();
        for i in batch {
            p.str(&format!("k{i}")).op(value);
        }
        p.op(b"u");
    }
    p
}

#[test]
fn many_setitems_keys_are_linear() {
    for n in [200_000, 1_000_000] {
        let mut p = many_keys(n, b"N");
        let message = refused("keys", &format!("keys-{n}.pt"), &torch_zip(&p.stop(), &[]));
        assert_contains(&message, "\"k0\" holds a None, not a tensor");
    }
    // MAX_TENSORS tensors, all views of one storage through the memo, load; 100k are too many.
    let (w, storage) = one_tensor();
    let with_tensor = |n| {
        let mut p = Pickle::new();
        p.tensor(&w).put(0); // left on the stack, below the dict
        let keys = many_keys(n, b"j\x00\x00\x00\x00");
        p.0.extend_from_slice(&keys.0[2..]); // without its PROTO
        torch_zip(&p.stop(), &[("0", storage.clone())])
    };
    let state = load(&write("keys", "tensors-max.pt", &with_tensor(MAX_TENSORS))).unwrap();
    assert_eq!(state.len(), MAX_TENSORS);
    let last = format!("k{}", MAX_TENSORS - 1);
    assert!(state.get(&last).unwrap().equal(state.get("k0").unwrap()));
    let message = refused("keys", "tensors-100k.pt", &with_tensor(100_000));
    assert_contains(&message, &format!("more than {MAX_TENSORS} tensors"));
}

#[test]
fn a_key_missing_from_a_million_entries_is_told_in_a_few_words() {
    let mut p = many_keys(1_000_000, b"N");
    let path = write("keys", "keys-lookup.pt", &torch_zip(&p.stop(), &[]));
    let start = std::time::Instant::now();
    let message = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || StateDict::from_file_key(path, "absent.deeper"))
        .unwrap()
        .join()
        .expect("the load panicked or overflowed its stack")
        .unwrap_err()
        .to_string();
    assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
    assert_contains(
        &message,
        "no entry \"absent\" in the pickled object (its entries: \"k0\": None",
    );
    assert_contains(&message, "\"k19\": None, ...)");
    assert!(message.len() < 1000, "{} bytes", message.len());
}

#[test]
fn the_metadata_entry_must_be_a_small_json_object_of_strings() {
    let (w, storage) = one_tensor();
    let with_entry = |json: &[u8]| {
        zip(&[
            Entry::stored("archive/data.pkl", &state_dict_pickle(std::slice::from_ref(&w))),
            Entry::stored("archive/byteorder", b"little"),
            Entry::stored("archive/data/0", &storage),
            Entry::stored("archive/tch_mix.json", json),
        ])
    };
    let fine = load(&write("meta", "meta-ok.pt", &with_entry(b"{\"tch_mix.mixer\": \"self\"}")));
    assert_eq!(fine.unwrap().metadata().get("tch_mix.mixer").unwrap(), "self");
    let huge = format!("{{\"k\": \"{}\"}}", "x".repeat(1 << 20));
    let cases: [(&str, &[u8], &str); 6] = [
        ("nested", b"{\"k\": {\"a\": \"b\"}}", "not a JSON object of strings"),
        ("number", b"{\"k\": 1}", "not a JSON object of strings"),
        ("list", b"[\"k\"]", "not a JSON object of strings"),
        ("not-utf8", b"{\"k\": \"\xff\"}", "not a JSON object of strings"),
        (
            "tensors",
            b"{}, \"t\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 0]}",
            "not a JSON object of strings",
        ),
        ("huge", huge.as_bytes(), "archive/tch_mix.json is larger than 65536 bytes"),
    ];
    for (name, json, expected) in cases {
        let message = refused("meta", &format!("meta-{name}.pt"), &with_entry(json));
        assert_contains(&message, expected);
    }
}

#[test]
fn stride_zero_views_stay_views() {
    // One stored float viewed as 4 tensors of 2^28 elements (4 GiB if made contiguous).
    let huge = |key: &str| TensorDef {
        key: key.into(),
        numel: 1,
        size: vec![1 << 28],
        stride: vec![0],
        ..TensorDef::float(key, "0", &[1])
    };
    let keys = ["a", "b", "c", "d"];
    let pickle = state_dict_pickle(&keys.map(huge));
    let path =
        write("views", "stride0-4x2e28.pt", &torch_zip(&pickle, &[("0", f32_bytes(&[7.5]))]));
    let state = load(&path).unwrap();
    let first = state.get("a").unwrap();
    for key in keys {
        let tensor = state.get(key).unwrap();
        assert_eq!(tensor.size(), [1 << 28]);
        assert_eq!(tensor.stride(), [0]);
        assert_eq!(tensor.data_ptr(), first.data_ptr(), "{key} is a copy, not a view");
        assert_eq!(tensor.double_value(&[(1 << 28) - 1]), 7.5);
    }
    // A mixer variable takes what it needs of such a view, and only that is materialised.
    let coeffs = TensorDef {
        key: "coeffs".into(),
        numel: 1,
        size: vec![5],
        stride: vec![0],
        ..TensorDef::float("coeffs", "0", &[1])
    };
    let pickle = state_dict_pickle(&[coeffs]);
    let path =
        write("views", "stride0-coeffs.pt", &torch_zip(&pickle, &[("0", f32_bytes(&[0.25]))]));
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = GlobalWeightsMixer::new(&vs.root(), 4, 5, Default::default()).unwrap();
    mix.load_state(&load(&path).unwrap()).unwrap();
    assert_eq!(Vec::<f32>::try_from(&mix.coeffs).unwrap(), [0.25; 5]);
}

#[test]
fn compressed_entries_are_read_no_further_than_their_storage() {
    let pickle = state_dict_pickle(&[TensorDef::float("w", "0", &[1])]);
    let entries = |storage: Entry| vec![Entry::stored("archive/data.pkl", &pickle), storage];
    // A deflate entry that inflates to 2 GiB of zeros, declared (and pickled) as 4 bytes: read
    // to one byte past what the pickle asks for, with a CRC (which the read never reaches) ...
    let bomb = deflate_zeros(2 << 30);
    let storage =
        Entry { name: "archive/data/0".into(), data: bomb.clone(), method: 8, size: 4, crc: 1 };
    let message = refused("bombs", "deflate-2gib.pt", &zip(&entries(storage)));
    assert_contains(&message, "more than 4 bytes for 1 elements of Float (4 bytes declared)");
    // ... and with a CRC of 0 (PyTorch's writer without CRCs), to one byte past what it declares.
    let storage = Entry { name: "archive/data/0".into(), data: bomb, method: 8, size: 4, crc: 0 };
    let message = refused("bombs", "deflate-2gib-nocrc.pt", &zip(&entries(storage)));
    assert_contains(
        &message,
        "archive/data/0: holds more than the 4 bytes its zip header declares",
    );
    // A bzip2 entry is refused before it is read: torch.load reads only stored and deflated ones.
    let mut bzip2 = b"BZh91AY&SY".to_vec();
    bzip2.resize(1200, 0);
    let storage = Entry { name: "archive/data/0".into(), data: bzip2, method: 12, size: 4, crc: 0 };
    let message = refused("bombs", "bzip2.pt", &zip(&entries(storage)));
    assert_contains(&message, "archive/data/0: compression method");
    assert_contains(&message, "is not supported");
    // An honest deflated storage loads, as in torch.load.
    let zeros = deflate_zeros(4);
    let crc = crc32(&[0; 4]);
    let storage = Entry { name: "archive/data/0".into(), data: zeros, method: 8, size: 4, crc };
    let state = load(&write("bombs", "deflate-ok.pt", &zip(&entries(storage)))).unwrap();
    assert_eq!(Vec::<f32>::try_from(state.get("w").unwrap()).unwrap(), [0.0]);
}

#[test]
fn archive_layout_is_pytorchs() {
    let (w, storage) = one_tensor();
    let pickle = state_dict_pickle(&[w]);
    // Two data.pkl in two top-level folders: refused, the same way every time.
    let two = zip(&[
        Entry::stored("a/data.pkl", &pickle),
        Entry::stored("b/data.pkl", &pickle),
        Entry::stored("a/data/0", &storage),
        Entry::stored("b/data/0", &storage),
    ]);
    let path = write("layout", "two-data-pkl.pt", &two);
    let first = load(&path).unwrap_err().to_string();
    assert_contains(&first, "two top-level folders, \"a\" and \"b\"");
    for _ in 0..20 {
        assert_eq!(load(&path).unwrap_err().to_string(), first);
    }
    // metadata.pkl is never the data.
    let meta = zip(&[Entry::stored("archive/metadata.pkl", &pickle)]);
    assert_contains(&refused("layout", "metadata-only.pt", &meta), "without archive/data.pkl");
    // Nor is a data.pkl outside a folder, or deeper in one.
    let bare = zip(&[Entry::stored("data.pkl", &pickle)]);
    assert_contains(&refused("layout", "bare.pt", &bare), "\"data.pkl\" is not in a folder");
    let deeper = zip(&[Entry::stored("archive/x/data.pkl", &pickle)]);
    assert_contains(&refused("layout", "deeper.pt", &deeper), "without archive/data.pkl");
}

#[test]
fn duplicate_entries_are_refused() {
    let (w, storage) = one_tensor();
    let twice = zip(&[
        Entry::stored("archive/data.pkl", &state_dict_pickle(&[w])),
        Entry::stored("archive/data/0", &storage),
        Entry::stored("archive/data/0", &f32_bytes(&[4.0, 5.0, 6.0])),
    ]);
    let message = refused("duplicates", "duplicate-data-0.pt", &twice);
    assert_contains(&message, "entry \"archive/data/0\" appears twice");
}

#[test]
fn sizes_strides_offsets_and_numel_near_i64_max_are_errors() {
    let max = i64::MAX;
    let base = TensorDef::float("w", "0", &[3]);
    let cases: Vec<(&str, TensorDef, &str)> = vec![
        (
            "numel-overflow",
            TensorDef { size: vec![max, 2], stride: vec![1, 1], ..base.clone() },
            "the element count of size [9223372036854775807, 2] overflows i64",
        ),
        (
            "extent-overflow",
            TensorDef { size: vec![3], stride: vec![max], ..base.clone() },
            "the extent of offset 0, size [3], stride [9223372036854775807] overflows i64",
        ),
        (
            "offset-overflow",
            TensorDef { offset: max, size: vec![2], stride: vec![1], ..base.clone() },
            "overflows i64",
        ),
        (
            "offset-past",
            TensorDef { offset: max, size: vec![1], stride: vec![1], ..base.clone() },
            "reaches element 9223372036854775807, past its storage of 3 elements",
        ),
        (
            "stride-past",
            TensorDef { size: vec![2], stride: vec![max], ..base.clone() },
            "past its storage of 3 elements",
        ),
        (
            "size-past",
            TensorDef { size: vec![4], ..base.clone() },
            "reaches element 3, past its storage of 3 elements",
        ),
        ("size-negative", TensorDef { size: vec![-1], ..base.clone() }, "size[0] = -1 is negative"),
        (
            "stride-negative",
            TensorDef { stride: vec![-1], ..base.clone() },
            "stride[0] = -1 is negative",
        ),
        (
            "offset-negative",
            TensorDef { offset: -1, ..base.clone() },
            "storage offset -1 is negative",
        ),
        (
            "empty-offset-past",
            TensorDef { size: vec![0], offset: 4, ..base.clone() },
            "storage offset 4 lies past its storage of 3 elements",
        ),
        (
            "numel-max",
            TensorDef { numel: max, ..base.clone() },
            "9223372036854775807 elements of Float overflow a byte count",
        ),
        (
            "numel-2e40",
            TensorDef { numel: 1 << 40, ..base.clone() },
            "12 bytes for 1099511627776 elements of Float (4398046511104 bytes declared)",
        ),
        (
            "numel-negative",
            TensorDef { numel: -1, ..base.clone() },
            "storage numel is not a non-negative int",
        ),
        (
            "dims",
            TensorDef {
                size: vec![1; MAX_DIMS + 1],
                stride: vec![1; MAX_DIMS + 1],
                ..base.clone()
            },
            "tensor of 65 dimensions, more than 64",
        ),
        (
            "dims-differ",
            TensorDef { stride: vec![1, 1], ..base.clone() },
            "tensor size has 1 dimensions, its stride 2",
        ),
    ];
    for (name, tensor, expected) in cases {
        let bytes = torch_zip(&state_dict_pickle(&[tensor]), &[("0", f32_bytes(&[1.0, 2.0, 3.0]))]);
        let message = refused("i64", &format!("{name}.pt"), &bytes);
        assert_contains(&message, expected);
    }
    // The same storage declared twice with different lengths.
    let other =
        TensorDef { key: "v".into(), numel: 2, size: vec![2], stride: vec![1], ..base.clone() };
    let bytes = torch_zip(
        &state_dict_pickle(&[base.clone(), other]),
        &[("0", f32_bytes(&[1.0, 2.0, 3.0]))],
    );
    let message = refused("i64", "storage-twice.pt", &bytes);
    assert_contains(
        &message,
        "storage \"0\" is declared as 2 elements of Float and elsewhere as 3",
    );
    // A 9-byte LONG1.
    let mut p = Pickle::new();
    let bytes = torch_zip(&p.op(&[0x8a, 9]).op(&[0xff; 9]).stop(), &[]);
    let message = refused("i64", "long1-9.pt", &bytes);
    assert_contains(&message, "integer too large");
}

#[test]
fn zip_end_records_are_checked_before_the_zip_reader_trusts_them() {
    let (w, storage) = one_tensor();
    let plain = torch_zip(&state_dict_pickle(&[w]), &[("0", storage)]);
    // Append a ZIP64 end record and locator before the end record.
    let zip64 = |record_at: Option<u64>, entries: u64| {
        let eocd = plain.len() - 22;
        let mut out = plain[..eocd].to_vec();
        let record = out.len() as u64;
        out.extend_from_slice(b"PK\x06\x06");
        out.extend_from_slice(&44u64.to_le_bytes());
        out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&plain[eocd + 12..eocd + 16]); // directory size
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&plain[eocd + 16..eocd + 20]); // directory offset
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(b"PK\x06\x07\0\0\0\0");
        out.extend_from_slice(&record_at.unwrap_or(record).to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&plain[eocd..]);
        out
    };
    let message = refused("zip64", "zip64-elsewhere.pt", &zip64(Some(0), 3));
    assert_contains(&message, "the ZIP64 end record is not at offset 0, where its locator points");
    let message = refused("zip64", "zip64-entries.pt", &zip64(None, 1 << 40));
    assert_contains(&message, "the zip archive claims 1099511627776 entries");
    // A sound ZIP64 end record loads.
    assert_eq!(load(&write("zip64", "zip64-ok.pt", &zip64(None, 3))).unwrap().len(), 1);
}

#[test]
fn safetensors_offsets_near_usize_max_are_errors() {
    let header = format!(
        "{{\"w\":{{\"dtype\":\"U8\",\"shape\":[{m}],\"data_offsets\":[0,{m}]}}}}",
        m = u64::MAX
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let message = refused("safetensors", "offsets.safetensors", &bytes);
    assert_contains(&message, "InvalidOffset(\"18446744073709551615\")");
}

/// A committed fixture rewritten with some metadata entries replaced.
fn with_metadata(name: &str, changes: &[(&str, &str)]) -> PathBuf {
    use safetensors::tensor::{serialize, SafeTensors};
    let bytes = std::fs::read(fixtures().join(name)).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = metadata.metadata().clone().unwrap();
    for (key, value) in changes {
        metadata.insert(key.to_string(), value.to_string());
    }
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let out = serialize(tensors.tensors(), &Some(metadata)).unwrap();
    let changed: Vec<String> = changes.iter().map(|(k, v)| format!("{k}-{v}")).collect();
    write("fixture", &format!("{}-{name}", changed.join("-")), &out)
}

#[test]
fn fixture_metadata_is_checked_before_the_mixer_is_built() {
    let instance = "instance-float32-2d-f3-skip-squeeze-masknone.safetensors";
    let cross = "cross-float32-3d-f3-h2-skip-squeeze-maskbool.safetensors";
    let cases = [
        (
            instance,
            ("n_features", "4096"),
            "state.project.weight has shape [3, 18], the metadata says [4096, 24576]",
        ),
        (
            cross,
            ("mod_dim", "16384"),
            "state.attention.in_proj_weight has shape [18, 6], the metadata says [49152, 16384]",
        ),
        (
            instance,
            ("n_features", "4611686018427387904"),
            "n_features x mod_dim = 4611686018427387904 x 6 overflows i64",
        ),
        (cross, ("mod_dim", "-4"), "metadata \"mod_dim\" = -4 is negative"),
        (instance, ("bias", "false"), "state.project.bias is not a weight of that mixer"),
    ];
    for (name, change, expected) in cases {
        let fixture = Fixture::read(with_metadata(name, &[change])).unwrap();
        let message = fixture.check(Device::Cpu).unwrap_err().to_string();
        assert_contains(&message, expected);
    }
}

#[test]
fn expected_state_is_what_the_mixer_builds_for_every_fixture() {
    let mut names: Vec<_> =
        std::fs::read_dir(fixtures()).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for path in names {
        let fixture = Fixture::read(&path).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let mixer = fixture.build(&vs.root()).unwrap();
        let mut built: Vec<(String, Vec<i64>)> =
            mixer.variables().into_iter().map(|(k, t)| (k.to_string(), t.size())).collect();
        let mut expected = fixture.expected_state().unwrap();
        built.sort();
        expected.sort();
        assert_eq!(built, expected, "{}", path.display());
    }
}

#[test]
fn torch_save_file_given_to_check_is_named_for_what_it_is() {
    let message = Fixture::read(data("model-float32.pt")).unwrap_err().to_string();
    assert_contains(&message, "a torch.save zip archive (weights), not a tch-mix fixture");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tch-mix"))
        .args(["check", data("model-float32.pt").to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert_contains(&stdout, "ERROR");
    assert_contains(&stdout, "a torch.save zip archive (weights), not a tch-mix fixture");
    assert_contains(
        &data("legacy.pt").to_str().map(|p| Fixture::read(p).unwrap_err().to_string()).unwrap(),
        "a legacy torch.save file",
    );
}
