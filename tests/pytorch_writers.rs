//! Every file PyTorch writes with its own writer options loads: files written by the installed
//! PyTorch at test time (`$TCH_MIX_PYTHON`, set by scripts/setup) with `compute_crc32 = False`,
//! pickle protocols 2 to 5, a 4096-byte `storage_alignment`, and half-precision state dicts,
//! each beside a safetensors twin of the same tensors written by PyTorch too. Without a Python
//! whose torch imports, the tests say so and return.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use tch_mix::StateDict;

/// Writes the files into a fresh folder, checking with torch.load that each reads back; `None` (after saying why) where no Python with torch is at hand.
const WRITE: &str = r#"
import sys, pathlib, torch
import torch.utils.serialization as serialization
from safetensors.torch import save_file

out = pathlib.Path(sys.argv[1])
config = serialization.config.save
for option in ("compute_crc32", "storage_alignment"):
    assert hasattr(config, option), f"torch.utils.serialization.config.save has no {option}"
torch.manual_seed(0)
linear = torch.nn.Linear(4, 3)
base = torch.randn(6, 4)
state = {"weight": linear.weight.detach(), "bias": linear.bias.detach(),
         "ints": torch.arange(7), "view": base[1:4], "base": base, "flags": torch.tensor([True, False])}
cases = {f"protocol{p}": (state, dict(pickle_protocol=p), {}) for p in (2, 3, 4, 5)}
cases["nocrc"] = (state, {}, {"compute_crc32": False})
cases["align4096"] = (state, {}, {"storage_alignment": 4096})
cases["nocrc-align4096"] = (state, {}, {"compute_crc32": False, "storage_alignment": 4096})
for dtype in (torch.float16, torch.bfloat16):
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    cases[str(dtype).removeprefix("torch.")] = (half, {}, {})
for name, (tensors, kwargs, options) in cases.items():
    saved = {k: getattr(config, k) for k in options}
    for k, v in options.items():
        setattr(config, k, v)
    try:
        torch.save(tensors, out / f"{name}.pt", **kwargs)
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
    # torch.load(weights_only=True) refuses pickle protocols 4 and 5 (their FRAME opcode); the
    # full unpickler reads them, which is safe here: the file was written just above.
    back = torch.load(out / f"{name}.pt", weights_only=kwargs.get("pickle_protocol", 2) < 4)
    assert all(torch.equal(back[k], v) for k, v in tensors.items()), name
print(" ".join(cases))
"#;

fn write_files(dir: &Path) -> Option<Vec<String>> {
    let Ok(python) = std::env::var("TCH_MIX_PYTHON") else {
        println!("SKIPPED: TCH_MIX_PYTHON is not set (run under . \"$(scripts/setup)\")");
        return None;
    };
    let probe = Command::new(&python).args(["-c", "import torch, safetensors"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!("SKIPPED: {python} cannot import torch and safetensors");
        return None;
    }
    let output = Command::new(&python).args(["-c", WRITE]).arg(dir).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let names = String::from_utf8(output.stdout).unwrap();
    Some(names.split_whitespace().map(str::to_string).collect())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tch-mix-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn files_from_every_pytorch_writer_option_load_with_the_same_tensors() {
    let dir = scratch("writers");
    let Some(names) = write_files(&dir) else { return };
    assert_eq!(names.len(), 9, "{names:?}");
    for name in &names {
        let pt = StateDict::from_file(dir.join(format!("{name}.pt")))
            .unwrap_or_else(|e| panic!("{name}.pt: {e}"));
        let twin = StateDict::from_file(dir.join(format!("{name}.safetensors"))).unwrap();
        let keys: Vec<&str> = pt.keys().collect();
        assert_eq!(keys, ["weight", "bias", "ints", "view", "base", "flags"], "{name}");
        for (key, tensor) in twin.iter() {
            let loaded = pt.get(key).unwrap();
            assert_eq!(loaded.kind(), tensor.kind(), "{name}: {key}");
            assert_eq!(loaded.size(), tensor.size(), "{name}: {key}");
            assert!(loaded.equal(tensor), "{name}: {key} differs from PyTorch's");
        }
        println!("{name}.pt: {} tensors as PyTorch wrote them", pt.len());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tch_mix_convert_takes_a_file_written_without_crcs() {
    let dir = scratch("convert-nocrc");
    let Some(_) = write_files(&dir) else { return };
    let out = dir.join("out.safetensors");
    let output = Command::new(env!("CARGO_BIN_EXE_tch-mix"))
        .arg("convert")
        .args([dir.join("nocrc.pt"), out.clone()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let converted = StateDict::from_file(&out).unwrap();
    let twin = StateDict::from_file(dir.join("nocrc.safetensors")).unwrap();
    for (key, tensor) in twin.iter() {
        assert!(converted.get(key).unwrap().equal(tensor), "{key}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
