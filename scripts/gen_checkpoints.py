#!/usr/bin/env python3
"""Write the weight files that tests/loading.rs reads, with the real torch.save and safetensors.

    gen_checkpoints.py [--out DIR]    (default: tests/data)

- model-{float32,bfloat16}.{pt,safetensors}: the state dict of a small model whose attribute
  ``mix`` is a swak InstanceWeightsMixer(4, 3) and ``head`` a Linear(4, 1), same values in both files.
- views.pt / views.safetensors: tensors sharing one storage (a transpose, a slice with an offset).
- whole-module.pt: ``torch.save(model)``, a pickled module rather than a state dict (to be refused).
- evil.pt: a pickle that would call ``os.system`` (to be refused, never run).
- legacy.pt: the pre-zip ``torch.save`` format.
- checkpoint.pt: what swak's ``Checkpoint.save`` writes (epoch, loss, the float32 model's state
  dict under ``model``, an Adam optimizer's state after one step, a StepLR scheduler's state);
  checkpoint-meta.pt the same with the model's mixer metadata added by tch_mix_tools.save.
- saved-swak.{pt,safetensors}: the float32 model saved by tch_mix_tools.save (with metadata).
- model-saver.pt: swak's ``ModelSaver`` (a whole pickled module, to be refused).
- ordered-dict.pt: ``torch.save`` of an OrderedDict of 40 small tensors (every dtype tch-mix
  writes, 0-d to 4-d, empty ones; values ``arange``), whose data.pkl tch-mix's writer must
  reproduce byte for byte.

Files are only added at the end, so the random draws of the earlier ones stay as they were.
"""
import argparse
import os
import pathlib
import pickle
import zipfile

import collections

import torch
from safetensors.torch import save_file
from swak.pt.io import ModelSaver
from swak.pt.mix import InstanceWeightsMixer
from swak.pt.train import Checkpoint

from tch_mix_tools import add_metadata, save

# The tensors of ordered-dict.pt, rebuilt by tests/saving.rs: key t<i>, dtype and shape cycling.
ORDERED_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
                  torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
ORDERED_SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 3), (1, 2, 1, 2), (300,)]


class Model(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.mix = InstanceWeightsMixer(4, 3, dtype=dtype)
        self.head = torch.nn.Linear(4, 1, dtype=dtype)


class Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "data"))
    out = pathlib.Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        model = Model(dtype)
        torch.save(model.state_dict(), out / f"model-{name}.pt")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"model-{name}.safetensors"))
    torch.save(Model(torch.float32), out / "whole-module.pt")

    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    views = {"base": base, "transposed": base.t(), "sliced": base[1:3, 2:5], "ints": torch.arange(5)}
    torch.save(views, out / "views.pt")
    save_file({k: v.contiguous() for k, v in views.items()}, str(out / "views.safetensors"))

    # A torch.save-shaped archive whose data.pkl would run a shell command if unpickled.
    with zipfile.ZipFile(out / "evil.pt", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
        archive.writestr("evil/byteorder", "little")
    torch.save(views, out / "legacy.pt", _use_new_zipfile_serialization=False)

    # A training checkpoint as swak writes it, after one Adam step.
    model = Model(torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model.head(model.mix(torch.randn(2, 3, 4))).sum().backward()
    optimizer.step()
    scheduler.step()
    for name in ["checkpoint.pt", "checkpoint-meta.pt"]:
        if (out / name).exists():
            (out / name).unlink()
        Checkpoint(str((out / name).resolve()), storage="file").save(3, 0.25, model, optimizer, scheduler)
    add_metadata(out / "checkpoint-meta.pt", model)
    save(model, out / "saved-swak.pt")
    save(model, out / "saved-swak.safetensors")
    if (out / "model-saver.pt").exists():
        (out / "model-saver.pt").unlink()
    ModelSaver(str((out / "model-saver.pt").resolve()))(model)

    ordered = collections.OrderedDict()
    for i in range(40):
        dtype, shape = ORDERED_DTYPES[i % len(ORDERED_DTYPES)], ORDERED_SHAPES[i % len(ORDERED_SHAPES)]
        numel = 1
        for n in shape:
            numel *= n
        ordered[f"t{i}"] = (torch.arange(numel) % 100).to(dtype).reshape(shape)
    torch.save(ordered, out / "ordered-dict.pt")
    print(f"wrote test checkpoints to {out}")


if __name__ == "__main__":
    main()
