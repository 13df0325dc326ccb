//! A mutation fuzzer for the readers of untrusted files, in plain Rust (no nightly toolchain for
//! `cargo fuzz` here): `StateDict::from_file` on safetensors and `torch.save` files (and
//! `StateDict::from_file_key` into a checkpoint's optimizer state), and `Fixture::read` +
//! `check` on fixtures. Every input must give `Ok` or `Err`: no panic, no
//! abort, no stack overflow (loads run on a 2 MiB stack), and no load slower than 5 s.
//!
//! Seeds are the files `scripts/gen_checkpoints.py` and `scripts/gen_fixtures.py` wrote with the
//! real torch.save and safetensors (`tests/data`, `tests/fixtures`), plus state dicts built here
//! (views, shared storages, a deflated entry). Mutations, from a fixed-seed PRNG: bit flips,
//! byte and integer overwrites with boundary values, truncations, insertions, deletions,
//! repeats and splices across seeds; for zip archives also pickle-aware edits of `data.pkl`
//! (opcode fragments inserted) re-zipped with valid CRCs, entries dropped, renamed, duplicated,
//! resized or deflated; for safetensors also numbers in the JSON header replaced.
//!
//! `TCH_MIX_FUZZ_SECS` (default 3) bounds the run, `TCH_MIX_FUZZ_SEED` picks the PRNG seed.
//! A failing input is kept in `target/tmp/fuzz-failures/`; if the process dies outright, the
//! input that killed it is the `current.*` file it printed first.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::craft::{crc32, deflate_zeros, f32_bytes, state_dict_pickle, zip, Entry, TensorDef};
use common::{data, fixtures};
use tch::Device;
use tch_mix::fixture::Fixture;
use tch_mix::StateDict;

/// What counts as a hang (the definition).
const HANG: Duration = Duration::from_secs(5);

/// splitmix64: a small, fixed-seed generator, so that a run can be repeated exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Safetensors,
    Torch,
    Fixture,
}

/// Values at the edges of the integer types, for overwrites.
const INTERESTING: [i64; 14] = [
    0,
    1,
    -1,
    0x7f,
    0x80,
    0xff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    1 << 62,
    i64::MAX,
    i64::MIN,
    -0x8000_0000,
];

/// Pickle fragments: the opcodes of a state dict and a few others, with arguments.
const FRAGMENTS: [&[u8]; 30] = [
    b"(",
    b")",
    b"]",
    b"}",
    b"N",
    b"\x85",
    b"\x86",
    b"\x87",
    b"t",
    b"a",
    b"e",
    b"s",
    b"u",
    b"b",
    b"R",
    b"Q",
    b"h\x00",
    b"q\x00",
    b"\x94",
    b"j\x00\x00\x00\x00",
    b"r\xff\xff\xff\xff",
    b"K\xff",
    b"J\xff\xff\xff\x7f",
    b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f",
    b"\x88",
    b".",
    b"ctorch\nFloatStorage\n",
    b"ccollections\nOrderedDict\n",
    b"X\x01\x00\x00\x000",
    b"\x93",
];

/// One generic byte-level mutation, with `donors` to splice from.
fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>, donors: &[Vec<u8>]) {
    let len = bytes.len();
    let at = |rng: &mut Rng| rng.below(len.max(1));
    match rng.below(9) {
        0 if len > 0 => {
            let i = at(rng);
            bytes[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = at(rng);
            let random = rng.next() as u8;
            bytes[i] = *rng.pick(&[0, 1, 0x7f, 0x80, 0xff, random]);
        }
        2 => bytes.truncate(at(rng)),
        3 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            bytes.splice(i..i, noise);
        }
        4 if len > 0 => {
            let i = at(rng);
            let end = (i + 1 + rng.below(64)).min(len);
            bytes.drain(i..end);
        }
        5 => {
            let donor = rng.pick(donors);
            if !donor.is_empty() {
                let from = rng.below(donor.len());
                let chunk = &donor[from..(from + 1 + rng.below(256)).min(donor.len())];
                let i = rng.below(len + 1);
                if rng.below(2) == 0 {
                    bytes.splice(i..i, chunk.iter().copied());
                } else {
                    let end = (i + chunk.len()).min(len);
                    bytes.splice(i..end, chunk.iter().copied());
                }
            }
        }
        6 if len > 0 => {
            let value = rng.pick(&INTERESTING).to_le_bytes();
            let width = *rng.pick(&[1, 2, 4, 8]);
            let i = at(rng);
            let end = (i + width).min(len);
            bytes[i..end].copy_from_slice(&value[..end - i]);
        }
        7 if len > 0 => {
            // Repeat a short range many times: long runs of one structure.
            let i = at(rng);
            let chunk: Vec<u8> = bytes[i..(i + 1 + rng.below(8)).min(len)].to_vec();
            let times = 1 + rng.below(2000);
            let repeated: Vec<u8> =
                chunk.iter().copied().cycle().take(chunk.len() * times).collect();
            bytes.splice(i..i, repeated);
        }
        _ => {
            let i = rng.below(len + 1);
            bytes.splice(i..i, rng.pick(&FRAGMENTS).iter().copied());
        }
    }
}

/// The entries of a trusted seed archive, read with the zip crate.
fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..archive.len())
        .map(|i| {
            let mut entry = archive.by_index(i).unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            (entry.name().to_string(), data)
        })
        .collect()
}

/// A mutated zip archive: `data.pkl` edited opcode-aware, entries changed, CRCs valid.
fn mutate_archive(rng: &mut Rng, entries: &[(String, Vec<u8>)], donors: &[Vec<u8>]) -> Vec<u8> {
    let mut entries: Vec<Entry> = entries.iter().map(|(n, d)| Entry::stored(n, d)).collect();
    for _ in 0..1 + rng.below(4) {
        if entries.is_empty() {
            break;
        }
        // Mostly the pickle.
        let i = match entries.iter().position(|e| e.name.ends_with("data.pkl")) {
            Some(pickle) if rng.below(3) > 0 => pickle,
            _ => rng.below(entries.len()),
        };
        match rng.below(10) {
            0 => {
                entries.remove(i);
                continue;
            }
            1 => entries.push(entries[i].clone()),
            2 => entries[i].name.push('x'),
            3 => {
                let n = rng.below(entries[i].data.len() * 2 + 8);
                entries[i].data.resize(n, 0);
            }
            4 => {
                let n = entries[i].data.len() as u64;
                let entry = &mut entries[i];
                entry.data = deflate_zeros(if rng.below(2) == 0 { n } else { n * 1000 + 1 });
                entry.method = 8;
                entry.size = n as u32;
                entry.crc = crc32(&vec![0; n as usize]);
                continue;
            }
            5 => {
                entries[i].method = *rng.pick(&[1, 12, 14, 93, 99]);
                continue;
            }
            _ => {
                for _ in 0..1 + rng.below(3) {
                    if rng.below(2) == 0 {
                        let at = rng.below(entries[i].data.len() + 1);
                        let fragment = rng.pick(&FRAGMENTS).iter().copied();
                        entries[i].data.splice(at..at, fragment);
                    } else {
                        mutate_bytes(rng, &mut entries[i].data, donors);
                    }
                }
            }
        }
        let entry = &mut entries[i];
        entry.size = entry.data.len() as u32;
        entry.crc = crc32(&entry.data);
        entry.method = 0;
    }
    zip(&entries)
}

/// A mutated safetensors file: a number of its JSON header replaced, or its bytes edited, with
/// the header's length prefix kept right or not.
fn mutate_safetensors(rng: &mut Rng, bytes: &[u8], donors: &[Vec<u8>]) -> Vec<u8> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let (mut header, data) = (bytes[8..8 + header_len].to_vec(), bytes[8 + header_len..].to_vec());
    let digits: Vec<usize> = (0..header.len()).filter(|&i| header[i].is_ascii_digit()).collect();
    const DTYPES: [&[u8]; 8] =
        [b"F32", b"F64", b"BF16", b"F16", b"I64", b"U8", b"BOOL", b"F8_E4M3"];
    let dtype = header.windows(9).position(|w| w == b"\"dtype\":\"");
    if let (Some(at), 0) = (dtype, rng.below(4)) {
        let start = at + 9;
        let end = (start..header.len()).find(|&i| header[i] == b'"').unwrap_or(header.len());
        header.splice(start..end, rng.pick(&DTYPES).iter().copied());
    } else if !digits.is_empty() && rng.below(2) == 0 {
        let start = *rng.pick(&digits);
        let end = (start..header.len()).find(|&i| !header[i].is_ascii_digit()).unwrap();
        let number = rng.pick(&INTERESTING).unsigned_abs().to_string();
        let number = if rng.below(4) == 0 { u64::MAX.to_string() } else { number };
        header.splice(start..end, number.bytes());
    } else {
        mutate_bytes(rng, &mut header, donors);
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    if rng.below(3) == 0 {
        mutate_bytes(rng, &mut out, donors);
    }
    out
}

struct Seeds {
    safetensors: Vec<Vec<u8>>,
    torch: Vec<Vec<u8>>,
    archives: Vec<Vec<(String, Vec<u8>)>>,
    fixtures: Vec<Vec<u8>>,
}

fn seeds() -> Seeds {
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let safetensors = ["model-float32", "model-bfloat16", "views", "saved-swak"]
        .map(|n| read(data(&format!("{n}.safetensors"))))
        .to_vec();
    let mut torch: Vec<Vec<u8>> =
        ["model-float32", "model-bfloat16", "views", "whole-module", "checkpoint-meta"]
            .map(|n| read(data(&format!("{n}.pt"))))
            .to_vec();
    // Built here: a shared storage viewed with an offset, a transpose and stride 0.
    let views = [
        TensorDef::float("a", "0", &[2, 3]),
        TensorDef {
            key: "t".into(),
            numel: 6,
            size: vec![3, 2],
            stride: vec![1, 3],
            ..TensorDef::float("t", "0", &[1])
        },
        TensorDef {
            key: "z".into(),
            numel: 6,
            offset: 5,
            size: vec![4],
            stride: vec![0],
            ..TensorDef::float("z", "0", &[1])
        },
    ];
    let pickle = state_dict_pickle(&views);
    let storage = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    torch.push(zip(&[
        Entry::stored("archive/data.pkl", &pickle),
        Entry::stored("archive/byteorder", b"little"),
        Entry {
            name: "archive/data/0".into(),
            data: deflate_zeros(24),
            method: 8,
            size: 24,
            crc: crc32(&[0; 24]),
        },
    ]));
    torch.push(common::craft::torch_zip(&pickle, &[("0", storage)]));
    let archives = torch.iter().map(|bytes| zip_entries(bytes)).collect();
    let fixtures = [
        "global-float32-2d-f3-skip-squeeze-masknone",
        "instance-float32-2d-f3-skip-squeeze-masknone",
        "cross-float32-2d-f3-h1-skip-squeeze-masknone",
        "self-float32-2d-f3-h1-skip-squeeze-masknone",
    ]
    .map(|n| read(fixtures().join(format!("{n}.safetensors"))))
    .to_vec();
    Seeds { safetensors, torch, archives, fixtures }
}

/// What one input gave.
enum Outcome {
    Ok,
    Err(String),
    Panic(String),
}

fn run(format: Format, path: &Path) -> Outcome {
    let result = catch_unwind(AssertUnwindSafe(|| match format {
        Format::Safetensors => StateDict::from_file(path).map(|_| ()),
        Format::Torch => {
            let nested = StateDict::from_file_key(path, "optimizer.state.0").map(|_| ());
            StateDict::from_file(path).map(|_| ()).and(nested)
        }
        Format::Fixture => Fixture::read(path).and_then(|f| f.check(Device::Cpu)).map(|_| ()),
    }));
    match result {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(err)) => Outcome::Err(err.to_string()),
        Err(panic) => Outcome::Panic(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
    }
}

#[derive(Default)]
struct Tally {
    inputs: u64,
    ok: u64,
    err: u64,
    slowest: Duration,
    /// Distinct error messages, digits masked and the file's path left out: how much of the
    /// readers' checking the inputs reached.
    messages: std::collections::BTreeSet<String>,
}

#[test]
fn mutated_files_give_ok_or_err_never_a_panic_or_a_hang() {
    let secs: f64 = std::env::var("TCH_MIX_FUZZ_SECS").map_or(3.0, |s| s.parse().unwrap());
    let seed: u64 = std::env::var("TCH_MIX_FUZZ_SEED").map_or(0x7c46_d1e5, |s| s.parse().unwrap());
    let mut rng = Rng(seed);
    let seeds = seeds();
    let donors: Vec<Vec<u8>> =
        seeds.safetensors.iter().chain(&seeds.torch).chain(&seeds.fixtures).cloned().collect();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let failures = dir.join("fuzz-failures");
    eprintln!(
        "fuzz: seed {seed}, {secs} s; if this process dies, its input is {}/current.*",
        dir.display()
    );

    // One worker thread with a 2 MiB stack runs the loads; a hang is a missing answer.
    let (jobs, inbox) = mpsc::channel::<(Format, PathBuf)>();
    let (outbox, answers) = mpsc::channel::<Outcome>();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            for (format, path) in inbox {
                if outbox.send(run(format, &path)).is_err() {
                    break;
                }
            }
        })
        .unwrap();

    let formats = [Format::Safetensors, Format::Torch, Format::Fixture];
    let mut tallies: Vec<Tally> = formats.iter().map(|_| Tally::default()).collect();
    let mut panics = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut round = 0usize;
    while Instant::now() < deadline {
        let which = round % formats.len();
        round += 1;
        let format = formats[which];
        let input = match format {
            Format::Safetensors => {
                let seed = rng.below(seeds.safetensors.len());
                mutate_safetensors(&mut rng, &seeds.safetensors[seed], &donors)
            }
            Format::Fixture => {
                let seed = rng.below(seeds.fixtures.len());
                mutate_safetensors(&mut rng, &seeds.fixtures[seed], &donors)
            }
            Format::Torch if rng.below(3) == 0 => {
                let mut bytes = seeds.torch[rng.below(seeds.torch.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    mutate_bytes(&mut rng, &mut bytes, &donors);
                }
                bytes
            }
            Format::Torch => {
                let i = rng.below(seeds.archives.len());
                mutate_archive(&mut rng, &seeds.archives[i], &donors)
            }
        };
        let path = dir.join(format!("current.{format:?}"));
        std::fs::write(&path, &input).unwrap();
        let start = Instant::now();
        jobs.send((format, path.clone())).unwrap();
        let outcome = match answers.recv_timeout(HANG) {
            Ok(outcome) => outcome,
            Err(_) => {
                std::fs::create_dir_all(&failures).unwrap();
                let kept = failures.join(format!("hang-{round}.{format:?}"));
                std::fs::copy(&path, &kept).unwrap();
                panic!(
                    "{format:?} input {round} took more than {HANG:?}: kept as {}",
                    kept.display()
                );
            }
        };
        let tally = &mut tallies[which];
        tally.inputs += 1;
        tally.slowest = tally.slowest.max(start.elapsed());
        match outcome {
            Outcome::Ok => tally.ok += 1,
            Outcome::Err(message) => {
                tally.err += 1;
                let message = message.replace(&path.display().to_string(), "");
                let masked = message.chars().map(|c| if c.is_ascii_digit() { '#' } else { c });
                tally.messages.insert(masked.take(60).collect());
            }
            Outcome::Panic(message) => {
                std::fs::create_dir_all(&failures).unwrap();
                let kept = failures.join(format!("panic-{round}.{format:?}"));
                std::fs::copy(&path, &kept).unwrap();
                panics.push(format!("{}: {message}", kept.display()));
            }
        }
    }
    for (format, t) in formats.iter().zip(&tallies) {
        eprintln!(
            "fuzz {format:?}: {} inputs, {} Ok, {} Err ({} distinct messages), {} panics, \
             slowest {:.1} ms",
            t.inputs,
            t.ok,
            t.err,
            t.messages.len(),
            t.inputs - t.ok - t.err,
            t.slowest.as_secs_f64() * 1e3
        );
        if std::env::var_os("TCH_MIX_FUZZ_MESSAGES").is_some() {
            for message in &t.messages {
                eprintln!("    {message}");
            }
        }
    }
    assert!(panics.is_empty(), "{} inputs panicked:\n{}", panics.len(), panics.join("\n"));
}
