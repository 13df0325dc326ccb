#!/usr/bin/env python3
"""Generate parity fixtures with non-finite numbers from the installed swak.

Writes 64 ``tch-mix-fixture/1`` files (default folder: tests/fixtures, names starting with
``nonfinite-``): each of the four mixers in float32 and float64, on 3-D input with 4 features and
2 heads, with one of eight non-finite patterns:

- ``nan1``: one NaN input element; ``nanrow``: one instance all NaN;
- ``posinf`` / ``neginf``: one +inf / -inf input element;
- ``huge``: one finite input element of ``sqrt(finfo.max) / 1000``, whose scores are huge but
  finite (where scores overflow, NaN or infinity depends on the order of a GEMM's sums: see the
  README);
- ``masknan``: a float mask with a NaN; ``maskinf``: a float mask with +inf;
- ``maskneginf``: a float mask with -inf entries, one row entirely -inf (fully masked).

Deterministic for a given seed. As with every fixture, the numbers are swak's; only a row that
the mask fully hides gets tch-mix's defined zero importance (see ``export_fixture``).

    gen_nonfinite_fixtures.py [--out DIR] [--seed N]
"""
import argparse
import itertools
import pathlib
import sys

import torch
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from export_fixture import export_fixture  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32}
MOD_DIM, N_FEATURES, N_HEADS, BATCH = 6, 4, 2, 5
PATTERNS = ["nan1", "nanrow", "posinf", "neginf", "huge", "masknan", "maskinf", "maskneginf"]


def make_mixer(name, dtype):
    """A swak mixer with random weights and non-zero biases."""
    if name == "global":
        mix = GlobalWeightsMixer(MOD_DIM, N_FEATURES, dtype=dtype)
        with torch.no_grad():
            mix.coeffs.copy_(torch.randn(N_FEATURES, dtype=torch.float64))
        return mix
    if name == "instance":
        return InstanceWeightsMixer(MOD_DIM, N_FEATURES, dtype=dtype)
    cls = CrossAttentionMixer if name == "cross" else SelfAttentionMixer
    mix = cls(MOD_DIM, N_HEADS, dtype=dtype)
    with torch.no_grad():
        for key, parameter in mix.named_parameters():
            if key.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, dtype=torch.float64))
    return mix


def make_case(pattern, dtype, generator):
    """The input ``(BATCH, N_FEATURES, MOD_DIM)`` and float mask (or None) of a pattern."""
    inp = torch.randn(BATCH, N_FEATURES, MOD_DIM, generator=generator, dtype=torch.float64).to(dtype)
    mask = None
    if pattern == "nan1":
        inp[1, 2, 3] = float("nan")
    elif pattern == "nanrow":
        inp[2] = float("nan")
    elif pattern == "posinf":
        inp[0, 1, 4] = float("inf")
    elif pattern == "neginf":
        inp[3, 0, 0] = float("-inf")
    elif pattern == "huge":
        inp[4, 3, 2] = torch.finfo(dtype).max ** 0.5 / 1000
    else:
        mask = torch.randn(BATCH, N_FEATURES, generator=generator, dtype=torch.float64).to(dtype)
        if pattern == "masknan":
            mask[1, 2] = float("nan")
        elif pattern == "maskinf":
            mask[2, 0] = float("inf")
        else:
            mask[0, 1] = float("-inf")
            mask[3] = float("-inf")
    return inp, mask


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = pathlib.Path(__file__).resolve().parent.parent
    parser.add_argument("--out", default=str(here / "tests" / "fixtures"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = list(itertools.product(["global", "instance", "cross", "self"], DTYPES, PATTERNS))
    for index, (mixer, dtype_name, pattern) in enumerate(cases):
        seed = 1_000_000 + args.seed * 10_000 + index
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        mix = make_mixer(mixer, DTYPES[dtype_name])
        inp, mask = make_case(pattern, DTYPES[dtype_name], generator)
        name = f"nonfinite-{mixer}-{dtype_name}-{pattern}.safetensors"
        export_fixture(mix, inp, out / name, mask=mask, seed=index)
    print(f"wrote {len(cases)} fixtures to {out}")


if __name__ == "__main__":
    main()
