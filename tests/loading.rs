//! Loading PyTorch-written weights: torch.save zip archives and safetensors, strictly.

mod common;

use common::data;
use tch::{nn, Device, Kind, Tensor};
use tch_mix::{load_var_store, InstanceWeightsMixer, MixError, Mixer, ShapeMismatch, StateDict};

fn instance_mixer(vs: &nn::VarStore) -> InstanceWeightsMixer {
    InstanceWeightsMixer::new(&(vs.root() / "mix"), 4, 3, Default::default()).unwrap()
}

#[test]
fn torch_save_and_safetensors_hold_the_same_state() {
    for dtype in ["float32", "bfloat16"] {
        let pt = StateDict::from_file(data(&format!("model-{dtype}.pt"))).unwrap();
        let st = StateDict::from_file(data(&format!("model-{dtype}.safetensors"))).unwrap();
        let keys: Vec<&str> = pt.keys().collect();
        assert_eq!(keys, ["mix.project.weight", "mix.project.bias", "head.weight", "head.bias"]);
        assert_eq!(pt.len(), st.len());
        for (key, tensor) in pt.iter() {
            let other = st.get(key).unwrap();
            assert_eq!(tensor.kind(), other.kind(), "{key}");
            assert!(tensor.equal(other), "{key} differs between .pt and .safetensors");
        }
    }
}

#[test]
fn shared_storages_offsets_and_strides_are_rebuilt() {
    let pt = StateDict::from_file(data("views.pt")).unwrap();
    let st = StateDict::from_file(data("views.safetensors")).unwrap();
    for key in ["base", "transposed", "sliced", "ints"] {
        let (a, b) = (pt.get(key).unwrap(), st.get(key).unwrap());
        assert_eq!(a.size(), b.size(), "{key}");
        assert_eq!(a.kind(), b.kind(), "{key}");
        assert!(a.equal(b), "{key}");
    }
    assert_eq!(pt.get("sliced").unwrap().size(), [2, 3]);
    assert_eq!(pt.get("ints").unwrap().kind(), Kind::Int64);
}

#[test]
fn mixer_loads_its_prefix_of_a_bigger_model_with_dtype_conversion() {
    let state = StateDict::from_file(data("model-bfloat16.pt")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu); // f32 mixer, bf16 file
    let mix = instance_mixer(&vs);
    mix.load_state(&state.sub("mix")).unwrap();
    let expected = state.get("mix.project.weight").unwrap().to_kind(Kind::Float);
    assert!(mix.weight.equal(&expected));
    assert_eq!(mix.weight.kind(), Kind::Float);
    assert!(mix
        .bias
        .as_ref()
        .unwrap()
        .equal(&state.get("mix.project.bias").unwrap().to_kind(Kind::Float)));
}

#[test]
fn var_store_loads_a_whole_model_strictly() {
    let state = StateDict::from_file(data("model-float32.safetensors")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _mix = instance_mixer(&vs);
    let head = nn::linear(vs.root() / "head", 4, 1, Default::default());
    load_var_store(&vs, &state).unwrap();
    assert!(head.ws.equal(state.get("head.weight").unwrap()));
}

fn strict_error(result: Result<(), MixError>) -> (Vec<String>, Vec<String>, Vec<ShapeMismatch>) {
    match result {
        Err(MixError::StrictLoad { missing, unexpected, mismatched }) => {
            (missing, unexpected, mismatched)
        }
        other => panic!("expected a strict-load error, got {other:?}"),
    }
}

#[test]
fn unprefixed_state_reports_every_missing_and_unexpected_key() {
    let state = StateDict::from_file(data("model-float32.pt")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = instance_mixer(&vs);
    let (missing, unexpected, mismatched) = strict_error(mix.load_state(&state));
    assert_eq!(missing, ["project.bias", "project.weight"]);
    assert_eq!(unexpected, ["mix.project.weight", "mix.project.bias", "head.weight", "head.bias"]);
    assert!(mismatched.is_empty());
}

#[test]
fn shape_mismatch_is_refused_and_nothing_is_copied() {
    let state = StateDict::from_file(data("model-float32.pt")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let mix = InstanceWeightsMixer::new(&vs.root(), 2, 6, Default::default()).unwrap(); // 12 inputs, 6 outputs
    let before = mix.weight.copy();
    let (missing, unexpected, mismatched) = strict_error(mix.load_state(&state.sub("mix")));
    assert!(missing.is_empty() && unexpected.is_empty());
    assert_eq!(
        mismatched,
        [
            ("project.weight".to_string(), vec![6, 12], vec![3, 12]),
            ("project.bias".to_string(), vec![6], vec![3])
        ]
    );
    assert!(mix.weight.equal(&before), "a failed load must not copy anything");
}

#[test]
fn extra_key_is_refused() {
    let state = StateDict::from_file(data("model-float32.pt")).unwrap();
    let mut entries: Vec<(String, Tensor)> =
        state.sub("mix").iter().map(|(k, t)| (k.to_string(), t.shallow_clone())).collect();
    entries.push(("project.scale".into(), Tensor::ones([3], (Kind::Float, Device::Cpu))));
    let vs = nn::VarStore::new(Device::Cpu);
    let (missing, unexpected, _) =
        strict_error(instance_mixer(&vs).load_state(&StateDict::new(entries)));
    assert!(missing.is_empty());
    assert_eq!(unexpected, ["project.scale"]);
    let message = instance_mixer(&nn::VarStore::new(Device::Cpu))
        .load_state(&StateDict::new(vec![]))
        .unwrap_err()
        .to_string();
    assert!(message.contains("missing keys [\"project.bias\", \"project.weight\"]"), "{message}");
}

fn format_error(path: std::path::PathBuf) -> String {
    match StateDict::from_file(&path) {
        Err(err @ MixError::Format { .. }) => err.to_string(),
        other => panic!("{}: expected a format error, got {other:?}", path.display()),
    }
}

#[test]
fn pickled_module_is_refused_not_executed() {
    let message = format_error(data("whole-module.pt"));
    assert!(message.contains("refusing global"), "{message}");
}

#[test]
fn malicious_pickle_is_refused_not_executed() {
    let message = format_error(data("evil.pt"));
    assert!(message.contains("refusing global \"posix.system\""), "{message}");
}

#[test]
fn legacy_torch_save_format_is_a_clear_error() {
    assert!(format_error(data("legacy.pt")).contains("legacy torch.save format"));
}

#[test]
fn truncated_and_foreign_files_are_errors_not_panics() {
    let dir = std::env::temp_dir().join(format!("tch-mix-loading-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["model-float32.pt", "model-float32.safetensors", "views.pt"] {
        let bytes = std::fs::read(data(name)).unwrap();
        for cut in [bytes.len() / 4, bytes.len() / 2, bytes.len() - 3] {
            let path = dir.join(format!("cut-{cut}-{name}"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            format_error(path);
        }
    }
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a checkpoint at all").unwrap();
    assert!(format_error(text).contains("neither a torch.save zip archive nor safetensors"));
    let missing = StateDict::from_file(dir.join("absent.pt")).unwrap_err();
    assert!(matches!(missing, MixError::Io { .. }), "{missing:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn duplicate_variable_names_are_refused_not_renamed() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _first = instance_mixer(&vs);
    let second = InstanceWeightsMixer::new(&(vs.root() / "mix"), 4, 3, Default::default());
    assert!(
        matches!(second, Err(MixError::DuplicateVariable(ref name)) if name == "mix.project.weight"),
        "{second:?}"
    );
}

#[test]
fn storages_larger_than_the_read_window_and_views_across_it_are_read_whole() {
    use common::craft::{f32_bytes, state_dict_pickle, torch_zip, TensorDef};
    // 300,000 floats (1.2 MB, several 64 KiB windows of the reader), and a view starting in the
    // middle of the storage.
    let values: Vec<f32> = (0..300_000).map(|i| i as f32).collect();
    let whole = TensorDef::float("whole", "0", &[300, 1000]);
    let tail = TensorDef {
        key: "tail".into(),
        numel: 300_000,
        offset: 123_457,
        size: vec![1000],
        stride: vec![7],
        ..TensorDef::float("tail", "0", &[1])
    };
    let bytes = torch_zip(&state_dict_pickle(&[whole, tail]), &[("0", f32_bytes(&values))]);
    let dir = std::env::temp_dir().join(format!("tch-mix-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("large.pt");
    std::fs::write(&path, bytes).unwrap();
    let state = StateDict::from_file(&path).unwrap();
    let whole = state.get("whole").unwrap();
    assert_eq!(whole.size(), [300, 1000]);
    assert_eq!(Vec::<f32>::try_from(whole.flatten(0, -1)).unwrap(), values);
    let tail: Vec<f32> = Vec::try_from(state.get("tail").unwrap()).unwrap();
    assert_eq!(tail, (0..1000).map(|i| (123_457 + 7 * i) as f32).collect::<Vec<_>>());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_swak_checkpoint_gives_its_model_by_default() {
    // checkpoint.pt: swak's Checkpoint.save(3, 0.25, model, adam, step_lr); saved-swak.pt: the
    // same model's state dict (scripts/gen_checkpoints.py).
    let expected = StateDict::from_file(data("saved-swak.pt")).unwrap();
    for state in [
        StateDict::from_file(data("checkpoint.pt")).unwrap(),
        StateDict::from_file_key(data("checkpoint.pt"), "model").unwrap(),
    ] {
        let keys: Vec<&str> = state.keys().collect();
        assert_eq!(keys, ["mix.project.weight", "mix.project.bias", "head.weight", "head.bias"]);
        for (key, t) in state.iter() {
            assert!(t.equal(expected.get(key).unwrap()), "{key}");
        }
        assert!(state.metadata().is_empty());
    }
    let vs = nn::VarStore::new(Device::Cpu);
    instance_mixer(&vs).load_file("tests/data/checkpoint.pt".as_ref(), "mix").unwrap();
}

#[test]
fn any_state_dict_of_a_checkpoint_is_reached_by_its_key_path() {
    let adam = StateDict::from_file_key(data("checkpoint.pt"), "optimizer.state.0").unwrap();
    assert_eq!(adam.keys().collect::<Vec<_>>(), ["step", "exp_avg", "exp_avg_sq"]);
    assert_eq!(adam.get("exp_avg").unwrap().size(), [3, 12]);
    assert_eq!(adam.get("step").unwrap().size(), Vec::<i64>::new());
}

fn key_error(path: &str, key: &str) -> String {
    match StateDict::from_file_key(data(path), key) {
        Err(err @ MixError::Format { .. }) => err.to_string(),
        other => panic!("{path} {key:?}: expected a format error, got {other:?}"),
    }
}

#[test]
fn a_missing_entry_lists_the_ones_there_are() {
    let message = key_error("checkpoint.pt", "modle");
    assert!(
        message.contains(
            "no entry \"modle\" in the pickled object (its entries: \"epoch\": int, \"loss\": \
             float, \"model\": dict, \"optimizer\": dict, \"scheduler\": dict)"
        ),
        "{message}"
    );
    let message = key_error("checkpoint.pt", "optimizer.states.0");
    assert!(
        message.contains(
            "no entry \"states\" in entry \"optimizer\" (its entries: \"state\": \
                          dict, \"param_groups\": list)"
        ),
        "{message}"
    );
    let message = key_error("checkpoint.pt", "optimizer.state.7");
    assert!(message.contains("no entry \"7\" in entry \"optimizer.state\" (its entries: 0: dict, 1: dict, 2: dict, 3: dict)"), "{message}");
    let message = key_error("checkpoint.pt", "epoch");
    assert!(message.contains("entry \"epoch\" is an int, not a state dict"), "{message}");
    let message = key_error("checkpoint.pt", "optimizer");
    assert!(
        message.contains(
            "entry \"optimizer\" is not a state dict: \"state\" holds a dict, not a tensor"
        ),
        "{message}"
    );
    let message = key_error("checkpoint.pt", "");
    assert!(
        message.contains("the pickled object is not a state dict: \"epoch\" holds an int"),
        "{message}"
    );
    let message = key_error("model-float32.safetensors", "model");
    assert!(message.contains("a safetensors file holds one flat state dict"), "{message}");
}

#[test]
fn whole_pickled_modules_are_refused_with_a_hint_to_save_the_state_dict() {
    for name in ["whole-module.pt", "model-saver.pt"] {
        let message = format_error(data(name));
        assert!(message.contains("refusing global"), "{message}");
        assert!(message.contains("save its state_dict() instead"), "{message}");
    }
}

#[test]
fn python_saved_metadata_is_read_and_checked() {
    // tch_mix_tools.save: safetensors __metadata__, the .pt's tch_mix.json entry, and the same
    // entry appended to a swak Checkpoint.
    let expected =
        InstanceWeightsMixer::new(&nn::VarStore::new(Device::Cpu).root(), 4, 3, Default::default())
            .unwrap()
            .spec();
    for name in ["saved-swak.pt", "saved-swak.safetensors", "checkpoint-meta.pt"] {
        let state = StateDict::from_file(data(name)).unwrap();
        assert_eq!(state.spec("mix").unwrap(), Some(expected), "{name}");
        let vs = nn::VarStore::new(Device::Cpu);
        instance_mixer(&vs).load_file(&data(name), "mix").unwrap();
        let no_skip = tch_mix::InstanceWeightsConfig { skip: false, ..Default::default() };
        let other = InstanceWeightsMixer::new(&vs.root(), 4, 3, no_skip).unwrap();
        let message = other.load_file(&data(name), "mix").unwrap_err().to_string();
        assert!(
            message.contains("saved from instance(") && message.contains("skip=true"),
            "{message}"
        );
        assert!(
            message.contains("loaded into instance(") && message.contains("skip=false"),
            "{message}"
        );
    }
    // The metadata describes the checkpoint's model: it comes with `model`, not other entries.
    let model = StateDict::from_file_key(data("checkpoint-meta.pt"), "model").unwrap();
    assert_eq!(model.spec("mix").unwrap(), Some(expected));
    let adam = StateDict::from_file_key(data("checkpoint-meta.pt"), "optimizer.state.0").unwrap();
    assert!(adam.metadata().is_empty());
}
