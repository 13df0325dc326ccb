#!/usr/bin/env python3
"""Write the weight files that tests/loading.rs reads, with the real torch.save and safetensors.

    gen_checkpoints.py [--out DIR]    (default: tests/data)

- model-{float32,bfloat16}.{pt,safetensors}: the state dict of a small model whose attribute
  ``mix`` is a swak InstanceWeightsMixer(4, 3) and ``head`` a Linear(4, 1), same values in both files.
- views.pt / views.safetensors: tensors sharing one storage (a transpose, a slice with an offset).
- whole-module.pt: ``torch.save(model)``, a pickled module rather than a state dict (to be refused).
- evil.pt: a pickle that would call ``os.system`` (to be refused, never run).
- legacy.pt: the pre-zip ``torch.save`` format.
"""
import argparse
import os
import pathlib
import pickle
import zipfile

import torch
from safetensors.torch import save_file
from swak.pt.mix import InstanceWeightsMixer


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
    print(f"wrote test checkpoints to {out}")


if __name__ == "__main__":
    main()
