#!/usr/bin/env python3
"""Weights both ways between swak and tch-mix, for all four mixers, against the installed swak.

    roundtrip_swak.py --bin target/debug/examples/train_roundtrip [--mixers global,self] [--work DIR]

The model, in both languages: per-feature encoders (``nn.Linear(E, D)`` each, stacked to
``(B, F, D)``), a swak mixer ``mix``, a linear ``head`` (examples/train_roundtrip.rs is the Rust
one). For each mixer:

1. Rust -> swak: the example trains the Rust model a few Adam steps and saves it
   (``rust.safetensors``, ``rust.pt``). Both load into the PyTorch model with
   ``load_state_dict(strict=True)`` (the ``.pt`` through ``torch.load(weights_only=True)``), carry
   the mixer's hyper-parameters as ``tch_mix_tools.save`` writes them, and give Rust's output
   and importance on Rust's input. The ``.pt``'s ``data.pkl`` is byte for byte what
   ``torch.save`` writes for the same ``OrderedDict``, and ``torch.load`` also reads it with
   ``mmap=True`` and ``map_location="meta"``.
2. swak -> Rust -> swak: the PyTorch model is trained a few steps and saved four ways:
   ``torch.save(state_dict)`` (no metadata), ``tch_mix_tools.save`` to ``.safetensors`` and ``.pt``,
   and swak's ``Checkpoint`` (its metadata added by ``tch_mix_tools.add_metadata``). Rust loads each
   (strictly, checking the metadata where there is some), gives swak's output on swak's input,
   and saves it again; swak loads what Rust saved with ``strict=True``: the same bits, the same
   output.

Outputs are judged by the parity rule of docs/parity.md against the same model in float64 (the
truth): tch-mix's error from it may be at most 4x swak's own float32 error plus 16 eps x the
truth's largest magnitude. Exits non-zero on the first disagreement.
"""
import argparse
import collections
import copy
import io
import pathlib
import subprocess
import tempfile
import zipfile

import torch
from safetensors.torch import load_file
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer
from swak.pt.train import Checkpoint

from tch_mix_tools import add_metadata, metadata, read_metadata, save

# As in examples/train_roundtrip.rs.
FEATURES, INPUT, DIM, BATCH = 3, 5, 8, 16
# The parity rule (docs/parity.md; tch_mix::fixture::TRUTH_MULTIPLE and TRUTH_FLOOR_EPS).
TRUTH_MULTIPLE, TRUTH_FLOOR_EPS = 4.0, 16.0


def make_mixer(name):
    if name == "global":
        return GlobalWeightsMixer(DIM, FEATURES)
    if name == "instance":
        return InstanceWeightsMixer(DIM, FEATURES)
    if name == "cross":
        return CrossAttentionMixer(DIM, n_heads=2)
    return SelfAttentionMixer(DIM, n_heads=2)


class Model(torch.nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.encoders = torch.nn.ModuleList(torch.nn.Linear(INPUT, DIM) for _ in range(FEATURES))
        self.mix = make_mixer(mixer)
        self.head = torch.nn.Linear(DIM, 1)

    def encode(self, x):
        return torch.stack([enc(x[:, i]) for i, enc in enumerate(self.encoders)], dim=1)

    def forward(self, x):
        return self.head(self.mix(self.encode(x)))

    def importance(self, x):
        return self.mix.importance(self.encode(x))


def check_close(what, actual, swak, truth):
    """tch-mix's `actual` against the float64 `truth`, allowed 4x swak's float32 error from it
    plus 16 eps x the truth's largest magnitude; returns tch-mix's error."""
    if actual.shape != truth.shape or swak.shape != truth.shape:
        raise SystemExit(f"FAIL {what}: shape {tuple(actual.shape)} vs {tuple(truth.shape)}")
    error = (actual.double() - truth).abs().max().item()
    swak_error = (swak.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    allowed = TRUTH_MULTIPLE * swak_error + TRUTH_FLOOR_EPS * torch.finfo(torch.float32).eps * scale
    if not error <= allowed:
        raise SystemExit(
            f"FAIL {what}: {error:.3g} from the float64 truth (swak {swak_error:.3g}, allowed {allowed:.3g})"
        )
    return error


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x), model.importance(x)


def truth(model, x):
    """The outputs of `model` in float64 on `x` (from a copy: `model` stays float32)."""
    return outputs(copy.deepcopy(model).double(), x.double())


def check_state(what, model, state):
    for key, value in model.state_dict().items():
        if value.dtype != state[key].dtype or not torch.equal(value, state[key]):
            raise SystemExit(f"FAIL {what}: {key} differs")


def check_pickle(path, state):
    """The data.pkl of a .pt from tch-mix against torch.save's for the same OrderedDict."""
    buffer = io.BytesIO()
    torch.save(collections.OrderedDict(state), buffer)
    ours, torchs = zipfile.ZipFile(path), zipfile.ZipFile(buffer)
    top = ours.namelist()[0].split("/")[0]
    if ours.read(f"{top}/data.pkl") != torchs.read("archive/data.pkl"):
        raise SystemExit(f"FAIL {path}: data.pkl differs from torch.save's")


def rust(binary, *args):
    done = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"FAIL {' '.join(map(str, args[:3]))}: {done.stderr.strip()}")
    return done.stdout


def rust_to_swak(binary, mixer, work):
    rust(binary, "train", "--mixer", mixer, "--out", work)
    saved = load_file(str(work / "rust-io.safetensors"))
    worst = 0.0
    for name in ["rust.pt", "rust.safetensors"]:
        path = work / name
        state = torch.load(path, weights_only=True) if name.endswith(".pt") else load_file(str(path))
        model = Model(mixer)
        model.load_state_dict(state, strict=True)
        if read_metadata(path) != metadata(model):
            raise SystemExit(f"FAIL {path}: metadata {read_metadata(path)} vs {metadata(model)}")
        out, importance = outputs(model, saved["input"])
        true_out, true_importance = truth(model, saved["input"])
        worst = max(worst, check_close(f"{mixer} {name} output", saved["output"], out, true_out))
        worst = max(
            worst, check_close(f"{mixer} {name} importance", saved["importance"], importance, true_importance)
        )
        if name.endswith(".pt"):
            check_pickle(path, state)
            # torch.load's other ways in: memory-mapped storages, and shapes only.
            mapped = torch.load(path, weights_only=True, mmap=True)
            if any(not torch.equal(mapped[k], v) for k, v in state.items()):
                raise SystemExit(f"FAIL {path}: torch.load(mmap=True) differs")
            meta = torch.load(path, weights_only=True, map_location="meta")
            if {k: v.shape for k, v in meta.items()} != {k: v.shape for k, v in state.items()}:
                raise SystemExit(f"FAIL {path}: torch.load(map_location='meta') differs")
    return worst


def swak_to_rust_to_swak(binary, mixer, work):
    torch.manual_seed(1)
    model = Model(mixer)
    x = torch.randn(BATCH, FEATURES, INPUT)
    target = x[:, 1].sum(-1, keepdim=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    out, importance = outputs(model, x)
    true_out, true_importance = truth(model, x)
    save({"input": x, "output": out, "importance": importance}, work / "py-io.safetensors")
    files = [work / "py-state.pt", work / "py-meta.safetensors", work / "py-meta.pt", work / "py-checkpoint.pt"]
    torch.save(model.state_dict(), files[0])
    save(model, files[1])
    save(model, files[2])
    Checkpoint(str(files[3].resolve()), storage="file").save(5, 0.5, model, optimizer)
    add_metadata(files[3], model)
    rust(binary, "resave", "--mixer", mixer, "--input", work / "py-io.safetensors", "--out", work, *files)
    worst = 0.0
    for file in files:
        computed = load_file(str(work / f"{file.stem}.io.safetensors"))
        worst = max(worst, check_close(f"{mixer} {file.name} in Rust: output", computed["output"], out, true_out))
        worst = max(
            worst,
            check_close(f"{mixer} {file.name} in Rust: importance", computed["importance"], importance, true_importance),
        )
        for ext in ["pt", "safetensors"]:
            path = work / f"{file.stem}.resaved.{ext}"
            state = torch.load(path, weights_only=True) if ext == "pt" else load_file(str(path))
            check_state(f"{path.name}", model, state)
            back = Model(mixer)
            back.load_state_dict(state, strict=True)
            if read_metadata(path) != metadata(back):
                raise SystemExit(f"FAIL {path}: metadata {read_metadata(path)}")
            again, _ = outputs(back, x)
            if not torch.equal(again, out):
                raise SystemExit(f"FAIL {path}: swak's output changed after the round trip")
    return worst


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True, help="the built examples/train_roundtrip")
    parser.add_argument("--mixers", default="global,instance,cross,self")
    parser.add_argument("--work", help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.work or tmp)
        for mixer in args.mixers.split(","):
            work = root / mixer
            work.mkdir(parents=True, exist_ok=True)
            there = rust_to_swak(args.bin, mixer, work)
            back = swak_to_rust_to_swak(args.bin, mixer, work)
            print(
                f"{mixer:<8} Rust -> swak (.pt, .safetensors): strict load, error from the float64 truth {there:.1e};  "
                f"swak (state dict .pt, .safetensors, .pt with metadata, Checkpoint) -> Rust -> swak: "
                f"strict load, same bits, error in Rust from the float64 truth {back:.1e}  PASS"
            )


if __name__ == "__main__":
    main()
