//! Saving weights for PyTorch: safetensors and torch.save's zip format, read back bit for bit;
//! the mixer's hyper-parameters as metadata, checked when loading; atomic writes.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::craft::scratch;
use common::data;
use tch::{nn, Device, Kind, Tensor};
use tch_mix::{
    AttentionConfig, CrossAttentionMixer, GlobalWeightsConfig, GlobalWeightsMixer,
    InstanceWeightsConfig, InstanceWeightsMixer, MixError, Mixer, SelfAttentionMixer, Spec,
    StateDict,
};

/// The raw bytes of a tensor (row-major, contiguous): equal bytes are equal bits, NaN included.
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, t.numel());
    out
}

fn assert_same_bits(a: &StateDict, b: &StateDict) {
    let mut keys_a: Vec<&str> = a.keys().collect();
    let mut keys_b: Vec<&str> = b.keys().collect();
    keys_a.sort();
    keys_b.sort();
    assert_eq!(keys_a, keys_b);
    for (key, t) in a.iter() {
        let u = b.get(key).unwrap();
        assert_eq!((t.kind(), t.size()), (u.kind(), u.size()), "{key}");
        assert_eq!(bytes(t), bytes(u), "{key}");
    }
    assert_eq!(a.metadata(), b.metadata());
}

/// Every dtype tch-mix writes, 0-d to 3-d, an empty tensor, a transposed (non-contiguous) view,
/// NaN and infinities, and a non-tch-mix metadata entry.
fn assorted() -> StateDict {
    let opts = |kind| (kind, Device::Cpu);
    let special = Tensor::from_slice(&[f32::NAN, f32::INFINITY, -0.0, 1e-45, -3.5]);
    let mut state = StateDict::new(vec![
        ("f32".into(), Tensor::randn([3, 4], opts(Kind::Float))),
        ("f32.transposed".into(), Tensor::randn([4, 5], opts(Kind::Float)).tr()),
        ("f64".into(), Tensor::randn([2, 3, 2], opts(Kind::Double))),
        ("bf16".into(), Tensor::randn([7], opts(Kind::BFloat16))),
        ("f16".into(), Tensor::randn([2, 2], opts(Kind::Half))),
        ("special".into(), special),
        ("scalar".into(), Tensor::from(2.5f64)),
        ("empty".into(), Tensor::zeros([3, 0], opts(Kind::Float))),
        ("steps".into(), Tensor::arange(6, opts(Kind::Int64))),
        ("mask".into(), Tensor::from_slice(&[true, false, true])),
    ]);
    state.metadata_mut().insert("trained_by".into(), "tests/saving.rs \"quoted\"\n".into());
    state
}

#[test]
fn saved_files_read_back_bit_for_bit_in_both_formats() {
    tch::manual_seed(0);
    let dir = scratch("bits");
    let state = assorted();
    assert!(!state.get("f32.transposed").unwrap().is_contiguous());
    for name in ["w.pt", "w.pth", "w.safetensors"] {
        state.save(dir.join(name)).unwrap();
        let back = StateDict::from_file(dir.join(name)).unwrap();
        assert_same_bits(&state, &back);
        if name != "w.safetensors" {
            // torch.save keeps the order of the state dict.
            assert_eq!(back.keys().collect::<Vec<_>>(), state.keys().collect::<Vec<_>>());
        }
    }
}

fn mixers(vs: &nn::VarStore, heads: i64) -> Vec<Box<dyn Mixer>> {
    let attention = AttentionConfig { n_heads: heads, ..Default::default() };
    let path = vs.root() / "mix";
    let mixers: Vec<Box<dyn Mixer>> = vec![
        Box::new(GlobalWeightsMixer::new(&path, 8, 3, GlobalWeightsConfig::default()).unwrap()),
        Box::new(
            InstanceWeightsMixer::new(&(&path / "i"), 8, 3, InstanceWeightsConfig::default())
                .unwrap(),
        ),
        Box::new(CrossAttentionMixer::new(&(&path / "c"), 8, attention).unwrap()),
        Box::new(SelfAttentionMixer::new(&(&path / "s"), 8, attention).unwrap()),
    ];
    for (_, t) in vs.variables() {
        tch::no_grad(|| t.shallow_clone().copy_(&Tensor::randn_like(&t)));
    }
    mixers
}

#[test]
fn every_mixer_saves_swaks_keys_under_its_prefix_with_its_spec() {
    tch::manual_seed(1);
    let dir = scratch("mixers");
    let vs = nn::VarStore::new(Device::Cpu);
    for mix in mixers(&vs, 2) {
        for (prefix, ext) in [("", "pt"), ("model.mix", "pt"), ("mix", "safetensors")] {
            let path = dir.join(format!("{}-{}.{ext}", mix.spec().name(), prefix.len()));
            mix.save_file(&path, prefix).unwrap();
            let state = StateDict::from_file(&path).unwrap();
            let dotted = |key: &str| match prefix {
                "" => key.to_string(),
                _ => format!("{prefix}.{key}"),
            };
            let mut expected: Vec<String> =
                mix.variables().iter().map(|(k, _)| dotted(k)).collect();
            let mut keys: Vec<String> = state.keys().map(String::from).collect();
            if ext == "safetensors" {
                expected.sort();
                keys.sort();
            }
            assert_eq!(keys, expected, "{path:?}");
            for (key, t) in mix.variables() {
                assert!(state.get(&dotted(key)).unwrap().equal(&t), "{key}");
            }
            assert_eq!(state.spec(prefix).unwrap(), Some(mix.spec()));
            assert_eq!(state.sub(prefix).spec("").unwrap(), Some(mix.spec()));
            // And back into a fresh mixer of the same class and hyper-parameters.
            let other = nn::VarStore::new(Device::Cpu);
            let fresh = mix.fresh_boxed(&other.root()).unwrap();
            fresh.load_file(&path, prefix).unwrap();
            for ((_, a), (_, b)) in fresh.variables().iter().zip(mix.variables()) {
                assert!(a.equal(&b));
            }
        }
    }
}

#[test]
fn loading_into_other_hyper_parameters_is_an_error_naming_both() {
    tch::manual_seed(2);
    let dir = scratch("spec");
    let vs = nn::VarStore::new(Device::Cpu);
    let four = AttentionConfig { n_heads: 4, ..Default::default() };
    let saved = CrossAttentionMixer::new(&vs.root(), 8, four).unwrap();
    for ext in ["pt", "safetensors"] {
        let path = dir.join(format!("cross.{ext}"));
        saved.save_file(&path, "mix").unwrap();
        let other = nn::VarStore::new(Device::Cpu);
        let two = AttentionConfig { n_heads: 2, ..Default::default() };
        let target = CrossAttentionMixer::new(&other.root(), 8, two).unwrap();
        let before = target.attention().in_proj_weight.copy();
        for result in [
            target.load_file(&path, "mix"),
            target.load_state(&StateDict::from_file(&path).unwrap().sub("mix")),
        ] {
            let message = result.unwrap_err().to_string();
            assert!(
                message.contains("saved from cross(") && message.contains("n_heads=4"),
                "{message}"
            );
            assert!(
                message.contains("loaded into cross(") && message.contains("n_heads=2"),
                "{message}"
            );
        }
        assert!(target.attention().in_proj_weight.equal(&before), "nothing may be copied");
        // A self-attention mixer of the same sizes has the same keys and shapes: refused too.
        let self_attention = SelfAttentionMixer::new(&(other.root() / "s"), 8, four).unwrap();
        let message = self_attention.load_file(&path, "mix").unwrap_err().to_string();
        assert!(
            message.contains("saved from cross(") && message.contains("into self("),
            "{message}"
        );
        // Dropout is a training setting: it may differ.
        let drop = AttentionConfig { dropout: 0.5, ..four };
        let target = CrossAttentionMixer::new(&(other.root() / "d"), 8, drop).unwrap();
        target.load_file(&path, "mix").unwrap();
        // Without metadata the same weights load on keys and shapes alone, as before.
        let state = StateDict::from_file(&path).unwrap().sub("mix");
        let bare = StateDict::new(state.iter().map(|(k, t)| (k.to_string(), t.copy())).collect());
        let target = CrossAttentionMixer::new(&(other.root() / "bare"), 8, two).unwrap();
        target.load_state(&bare).unwrap();
    }
}

#[test]
fn a_var_store_saves_whole_with_an_optional_prefix_and_the_specs_added() {
    tch::manual_seed(3);
    let dir = scratch("varstore");
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = InstanceWeightsMixer::new(&(vs.root() / "mix"), 4, 3, Default::default()).unwrap();
    let _head = nn::linear(vs.root() / "head", 4, 1, Default::default());
    let mut state = StateDict::from_var_store(&vs, "net");
    state.set_spec("net.mix", &mix.spec());
    let keys: Vec<&str> = state.keys().collect();
    assert_eq!(
        keys,
        ["net.head.bias", "net.head.weight", "net.mix.project.bias", "net.mix.project.weight"]
    );
    let path = dir.join("net.pt");
    state.save(&path).unwrap();
    let back = StateDict::from_file(&path).unwrap();
    assert_eq!(back.metadata().get("tch_mix.net.mix.n_features").unwrap(), "3");
    // sub() moves the metadata with the weights, with_prefix() back.
    let net = back.sub("net");
    assert_eq!(net.spec("mix").unwrap(), Some(mix.spec()));
    assert_eq!(net.sub("mix").spec("").unwrap(), Some(mix.spec()));
    assert_eq!(net.sub("head").spec("").unwrap(), None);
    assert_eq!(net.with_prefix("net").metadata(), back.metadata());
    // The whole store loads back strictly.
    let other = nn::VarStore::new(Device::Cpu);
    let _mix = InstanceWeightsMixer::new(&(other.root() / "mix"), 4, 3, Default::default());
    let _head = nn::linear(other.root() / "head", 4, 1, Default::default());
    tch_mix::load_var_store(&other, &net).unwrap();
    let original = StateDict::from_var_store(&vs, "");
    for (key, t) in StateDict::from_var_store(&other, "").iter() {
        assert!(t.equal(original.get(key).unwrap()), "{key}");
    }
}

fn archive_entry(path: &Path, name: &str) -> Vec<u8> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let top = archive.file_names().next().unwrap().split('/').next().unwrap().to_string();
    let mut entry = archive.by_name(&format!("{top}/{name}")).unwrap();
    let mut out = Vec::new();
    entry.read_to_end(&mut out).unwrap();
    out
}

/// The tensors of tests/data/ordered-dict.pt (scripts/gen_checkpoints.py's ORDERED_*).
fn ordered_dict() -> StateDict {
    let kinds = [
        Kind::Float,
        Kind::Double,
        Kind::BFloat16,
        Kind::Half,
        Kind::Int64,
        Kind::Int,
        Kind::Int16,
        Kind::Int8,
        Kind::Uint8,
        Kind::Bool,
    ];
    let shapes: [&[i64]; 7] = [&[], &[0], &[3], &[2, 3], &[2, 0, 3], &[1, 2, 1, 2], &[300]];
    let entries = (0..40)
        .map(|i| {
            let shape = shapes[i % shapes.len()];
            let numel: i64 = shape.iter().product();
            let values = Tensor::arange(numel, (Kind::Int64, Device::Cpu)).remainder(100);
            (format!("t{i}"), values.to_kind(kinds[i % kinds.len()]).reshape(shape))
        })
        .collect();
    StateDict::new(entries)
}

#[test]
fn the_pickle_is_byte_for_byte_what_torch_save_writes() {
    let dir = scratch("pickle");
    let ours = dir.join("ordered.pt");
    ordered_dict().save(&ours).unwrap();
    let torch = data("ordered-dict.pt");
    assert_eq!(archive_entry(&ours, "data.pkl"), archive_entry(&torch, "data.pkl"));
    assert_eq!(archive_entry(&ours, "byteorder"), b"little");
    assert_eq!(archive_entry(&ours, "version"), archive_entry(&torch, "version"));
    for i in 0..40 {
        let name = format!("data/{i}");
        assert_eq!(archive_entry(&ours, &name), archive_entry(&torch, &name), "{name}");
    }
    assert_same_bits(&StateDict::from_file(&torch).unwrap(), &StateDict::from_file(&ours).unwrap());
}

#[test]
fn storages_are_stored_uncompressed_at_64_byte_offsets() {
    let dir = scratch("aligned");
    let path = dir.join("aligned.pt");
    ordered_dict().save(&path).unwrap();
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    for i in 0..archive.len() {
        let entry = archive.by_index(i).unwrap();
        assert_eq!(entry.compression(), zip::CompressionMethod::Stored);
        if entry.name().contains("/data/") {
            assert_eq!(entry.data_start() % 64, 0, "{}", entry.name());
        }
    }
}

/// The names in `dir`, sorted.
fn listing(dir: &PathBuf) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn failed_saves_leave_no_file_and_no_temporary() {
    let dir = scratch("atomic");
    let state = assorted();
    // An unknown extension.
    let err = state.save(dir.join("w.bin")).unwrap_err().to_string();
    assert!(err.contains(".safetensors") && err.contains(".pt or .pth"), "{err}");
    // A dtype neither format takes.
    let complex =
        StateDict::new(vec![("z".into(), Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu)))]);
    let err = complex.save(dir.join("z.pt")).unwrap_err().to_string();
    assert!(err.contains("\"z\": dtype ComplexFloat cannot be saved"), "{err}");
    // The rename fails (a folder holds the name): the temporary file is removed.
    std::fs::create_dir(dir.join("taken.pt")).unwrap();
    std::fs::create_dir(dir.join("taken.safetensors")).unwrap();
    for name in ["taken.pt", "taken.safetensors"] {
        assert!(matches!(state.save(dir.join(name)), Err(MixError::Io { .. })));
    }
    // A folder that does not exist.
    assert!(state.save(dir.join("absent/w.pt")).is_err());
    assert_eq!(listing(&dir), ["taken.pt", "taken.safetensors"]);
    // An existing file is replaced whole by a successful save, and kept by a failed one.
    let path = dir.join("kept.pt");
    state.save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(complex.save(&path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    ordered_dict().save(&path).unwrap();
    assert_eq!(StateDict::from_file(&path).unwrap().len(), 40);
    assert_eq!(listing(&dir), ["kept.pt", "taken.pt", "taken.safetensors"]);
}

#[test]
fn floating_tensors_convert_and_the_rest_stays() {
    let state = assorted().to_float_kind(Kind::BFloat16).unwrap();
    for (key, t) in state.iter() {
        let expected = match key {
            "steps" => Kind::Int64,
            "mask" => Kind::Bool,
            _ => Kind::BFloat16,
        };
        assert_eq!(t.kind(), expected, "{key}");
    }
    assert_eq!(state.metadata(), assorted().metadata());
    assert!(assorted().to_float_kind(Kind::Int).is_err());
}

#[test]
fn spec_metadata_with_a_missing_field_is_an_error() {
    let mut state = StateDict::new(vec![]);
    let spec = Spec::Cross { mod_dim: 8, config: AttentionConfig::default() };
    state.set_spec("mix", &spec);
    assert_eq!(state.spec("mix").unwrap(), Some(spec));
    state.metadata_mut().remove("tch_mix.mix.n_heads");
    let message = state.spec("mix").unwrap_err().to_string();
    assert!(
        message.contains("tch_mix.mix") && message.contains("\"n_heads\" is missing"),
        "{message}"
    );
    // set_spec replaces what described a mixer there before.
    state.set_spec("mix", &Spec::Global { mod_dim: 8, n_features: 2, config: Default::default() });
    assert!(!state.metadata().contains_key("tch_mix.mix.bias"));
}

/// A tensor of more than one 4 MiB chunk, its last chunk partial, and a transposed view of one.
fn large(device: Device) -> StateDict {
    let big = Tensor::randn([1_300_001], (Kind::Float, device));
    let wide = Tensor::randn([700, 1500], (Kind::Double, device)).tr();
    StateDict::new(vec![("big".into(), big), ("wide".into(), wide)])
}

fn saves_chunk_by_chunk(device: Device) {
    tch::manual_seed(4);
    let dir = scratch(&format!("chunks-{device:?}"));
    let state = large(device);
    let on_cpu = StateDict::new(
        state.iter().map(|(k, t)| (k.to_string(), t.to_device(Device::Cpu))).collect(),
    );
    for name in ["large.pt", "large.safetensors"] {
        state.save(dir.join(name)).unwrap();
        assert_same_bits(&on_cpu, &StateDict::from_file(dir.join(name)).unwrap());
    }
}

#[test]
fn tensors_larger_than_a_chunk_are_written_whole() {
    saves_chunk_by_chunk(Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA device; scripts/device_check runs it with --ignored"]
fn cuda_tensors_are_copied_to_the_file_chunk_by_chunk() {
    saves_chunk_by_chunk(common::cuda());
}
