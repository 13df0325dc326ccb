#!/usr/bin/env python3
"""Generate the project's parity fixtures from the installed swak.

Writes one ``tch-mix-fixture/1`` file per case into the output folder (default: tests/fixtures).
The grid covers every mixer flag, 2-D/3-D/4-D inputs, 0, 1 and several features, no/bool/float
masks (fully masked rows too), 1-3 heads, and float64/float32/bfloat16/float16, each with a gradient block. Deterministic for a given seed.

    gen_fixtures.py [--out DIR] [--seed N]
"""
import argparse
import itertools
import pathlib
import sys

import torch
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export_fixture import export_fixture  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MOD_DIM = 6
LEADING = {"2d": (), "3d": (4,), "4d": (2, 3)}


def weight_cases():
    """(name, mixer factory, leading dims, mask kind) for the two weight mixers."""
    cases = []
    flags = list(itertools.product([True, False], [False, True], LEADING))  # skip, keep_dim, shape
    for mixer, dtype_name in itertools.product(["global", "instance"], DTYPES):
        for i, (skip, keep_dim, shape) in enumerate(flags):
            n_features = [3, 1, 0][(i // 3) % 3]  # with the shape (i % 3): all 9 pairs
            bias = i % 2 == 0
            dropout = [0.0, 0.25][(i // 6) % 2]
            mask = ["none", "bool", "float"][(i // 4) % 3]
            dtype = DTYPES[dtype_name]
            if mixer == "global":
                def make(n=n_features, s=skip, k=keep_dim, p=dropout, d=dtype):
                    mix = GlobalWeightsMixer(MOD_DIM, n, dropout=p, skip=s, keep_dim=k, dtype=d)
                    with torch.no_grad():
                        mix.coeffs.copy_(torch.randn(n, dtype=torch.float64))
                    return mix
            else:
                def make(n=n_features, b=bias, s=skip, k=keep_dim, p=dropout, d=dtype):
                    return InstanceWeightsMixer(MOD_DIM, n, bias=b, dropout=p, skip=s, keep_dim=k, dtype=d)
            name = "-".join([
                mixer, dtype_name, shape, f"f{n_features}",
                "skip" if skip else "noskip", "keep" if keep_dim else "squeeze",
                *(["nobias"] if mixer == "instance" and not bias else []),
                *([f"drop{dropout}"] if dropout else []), f"mask{mask}",
            ])
            cases.append((name, make, LEADING[shape], n_features, mask))
    return cases


def attention_cases():
    """(name, mixer factory, leading dims, n_features, mask kind) for the two attention mixers."""
    cases = []
    flags = list(itertools.product([True, False], [False, True], LEADING))  # skip, keep_dim, shape
    classes = {"cross": CrossAttentionMixer, "self": SelfAttentionMixer}
    for mixer, dtype_name in itertools.product(classes, DTYPES):
        for i, (skip, keep_dim, shape) in enumerate(flags):
            n_features = [3, 1, 0][(i // 3) % 3]
            n_heads = [1, 2, 3][i % 3]
            bias = (i // 2) % 2 == 0
            dropout = [0.0, 0.25][(i // 6) % 2]
            mask = ["none", "bool", "float", "boolfull"][(i + i // 4) % 4]
            dtype = DTYPES[dtype_name]

            def make(cls=classes[mixer], h=n_heads, b=bias, s=skip, k=keep_dim, p=dropout, d=dtype):
                mix = cls(MOD_DIM, h, bias=b, dropout=p, skip=s, keep_dim=k, dtype=d)
                with torch.no_grad():  # non-zero biases, so that they are checked too
                    for name, parameter in mix.named_parameters():
                        if name.endswith("bias"):
                            parameter.copy_(0.1 * torch.randn(parameter.shape, dtype=torch.float64))
                return mix
            name = "-".join([
                mixer, dtype_name, shape, f"f{n_features}", f"h{n_heads}",
                "skip" if skip else "noskip", "keep" if keep_dim else "squeeze",
                *([] if bias else ["nobias"]), *([f"drop{dropout}"] if dropout else []), f"mask{mask}",
            ])
            cases.append((name, make, LEADING[shape], n_features, mask))
    return cases


def make_mask(kind, shape, generator, dtype):
    """No mask, a bool mask (True = ignore; "boolfull" with its first row fully masked) or a float
    mask in the mixer's dtype (added to the attention scores)."""
    if kind == "none":
        return None
    if kind in ("bool", "boolfull"):
        mask = torch.rand(shape, generator=generator) < 0.3
        if kind == "boolfull" and mask.numel() > 0:
            mask.view(-1, shape[-1])[0] = True
        return mask
    return torch.randn(shape, generator=generator).to(dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = pathlib.Path(__file__).resolve().parent.parent
    parser.add_argument("--out", default=str(here / "tests" / "fixtures"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = weight_cases() + attention_cases()
    for index, (name, make, leading, n_features, mask_kind) in enumerate(cases):
        torch.manual_seed(args.seed * 10_000 + index)
        generator = torch.Generator().manual_seed(args.seed * 10_000 + index)
        mixer = make()
        inp = torch.randn(*leading, n_features, MOD_DIM, generator=generator, dtype=torch.float64)
        mask = make_mask(mask_kind, (*leading, n_features), generator, mixer.dtype)
        export_fixture(mixer, inp, out / f"{name}.safetensors", mask=mask, seed=index)
    print(f"wrote {len(cases)} fixtures to {out}")


if __name__ == "__main__":
    main()
