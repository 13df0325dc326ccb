"""The fixture sets tch-mix is tested with, generated from the installed swak.

Three sets, each deterministic for a seed (which the file names do not carry; the metadata
entry ``seed`` does):

- the grid (``tch-mix-gen-fixtures``, 192 files): every mixer flag, 2-D/3-D/4-D inputs, 0, 1 and
  3 features, 1-3 heads, no/bool/float masks (fully masked rows too), in float64, float32,
  bfloat16 and float16, each with a gradient block;
- the NaN/Inf set (``tch-mix-gen-nonfinite-fixtures``, 72 files ``nonfinite-*``): each mixer in
  float32 and float64, on 3-D input with 4 features and 2 heads, with one of nine patterns
  (``PATTERNS``);
- the trained-scale set (``tch-mix-gen-scale-fixtures``, ``scale-*``): each mixer in float32 with
  16 features, 4 heads and a batch of 64, mod_dim 64, 100 and 256, its weights at 1x, 3x and 10x
  their initial scale, as training grows them, half of the cases with a padding mask.

    tch-mix-gen-fixtures --out DIR --seed N
    python -m tch_mix_tools.fixtures grid|nonfinite|scale --out DIR --seed N
"""
import argparse
import itertools
import pathlib
import warnings

import torch
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer

from .fixture import export_fixture

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = {"cross": CrossAttentionMixer, "self": SelfAttentionMixer}

# The grid.
GRID_MOD_DIM = 6
LEADING = {"2d": (), "3d": (4,), "4d": (2, 3)}


def nonzero_biases(mix):
    """Draws every bias of ``mix`` from 0.1 N(0, 1), so that biases are checked too."""
    with torch.no_grad():
        for name, parameter in mix.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, dtype=torch.float64))
    return mix


def weight_cases():
    """(name, mixer factory, leading dims, n_features, mask kind) for the two weight mixers."""
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
                    mix = GlobalWeightsMixer(GRID_MOD_DIM, n, dropout=p, skip=s, keep_dim=k, dtype=d)
                    with torch.no_grad():
                        mix.coeffs.copy_(torch.randn(n, dtype=torch.float64))
                    return mix
            else:
                def make(n=n_features, b=bias, s=skip, k=keep_dim, p=dropout, d=dtype):
                    return InstanceWeightsMixer(GRID_MOD_DIM, n, bias=b, dropout=p, skip=s, keep_dim=k, dtype=d)
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
    for mixer, dtype_name in itertools.product(ATTENTION, DTYPES):
        for i, (skip, keep_dim, shape) in enumerate(flags):
            n_features = [3, 1, 0][(i // 3) % 3]
            n_heads = [1, 2, 3][i % 3]
            bias = (i // 2) % 2 == 0
            dropout = [0.0, 0.25][(i // 6) % 2]
            mask = ["none", "bool", "float", "boolfull"][(i + i // 4) % 4]
            dtype = DTYPES[dtype_name]

            def make(cls=ATTENTION[mixer], h=n_heads, b=bias, s=skip, k=keep_dim, p=dropout, d=dtype):
                return nonzero_biases(cls(GRID_MOD_DIM, h, bias=b, dropout=p, skip=s, keep_dim=k, dtype=d))
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


def write_grid(out, seed):
    """Writes the grid's 192 fixtures into ``out``; returns how many."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = weight_cases() + attention_cases()
    # The cases with no features are meant: PyTorch's init warns that it has nothing to draw.
    warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
    for index, (name, make, leading, n_features, mask_kind) in enumerate(cases):
        torch.manual_seed(seed * 10_000 + index)
        generator = torch.Generator().manual_seed(seed * 10_000 + index)
        mixer = make()
        inp = torch.randn(*leading, n_features, GRID_MOD_DIM, generator=generator, dtype=torch.float64)
        mask = make_mask(mask_kind, (*leading, n_features), generator, mixer.dtype)
        export_fixture(mixer, inp, out / f"{name}.safetensors", mask=mask, seed=index, meta={"seed": str(seed)})
    return len(cases)


# The NaN/Inf set.
NF_MOD_DIM, NF_FEATURES, NF_HEADS, NF_BATCH = 6, 4, 2, 5
PATTERNS = {
    "nan1": "one NaN input element",
    "nanrow": "one instance all NaN",
    "posinf": "one +inf input element",
    "neginf": "one -inf input element",
    "deadquery": "one +inf input element whose query has nothing but -inf scores in head 0 (self-attention)",
    "huge": "one finite input element of sqrt(finfo.max) / 1000, in instance HUGE_ROW",
    "masknan": "a float mask with a NaN",
    "maskinf": "a float mask with +inf",
    "maskneginf": "a float mask with -inf entries, one row entirely -inf (fully masked)",
}
HUGE_ROW = 4
ORDER_OF_SUMS = (
    "a huge finite input saturates the attention softmax of its instance: the gradients through "
    "it are differences of huge, nearly equal numbers, whose value the order of sums decides"
)


def nonfinite_mixer(name, dtype):
    """A swak mixer with random weights and non-zero biases."""
    if name == "global":
        mix = GlobalWeightsMixer(NF_MOD_DIM, NF_FEATURES, dtype=dtype)
        with torch.no_grad():
            mix.coeffs.copy_(torch.randn(NF_FEATURES, dtype=torch.float64))
        return mix
    if name == "instance":
        return InstanceWeightsMixer(NF_MOD_DIM, NF_FEATURES, dtype=dtype)
    return nonzero_biases(ATTENTION[name](NF_MOD_DIM, NF_HEADS, dtype=dtype))


def nonfinite_case(pattern, dtype, generator):
    """The input ``(NF_BATCH, NF_FEATURES, NF_MOD_DIM)`` and float mask (or None) of a pattern."""
    inp = torch.randn(NF_BATCH, NF_FEATURES, NF_MOD_DIM, generator=generator, dtype=torch.float64).to(dtype)
    mask = None
    if pattern == "nan1":
        inp[1, 2, 3] = float("nan")
    elif pattern == "nanrow":
        inp[2] = float("nan")
    elif pattern in ("posinf", "deadquery"):
        inp[0, 1, 4] = float("inf")
    elif pattern == "neginf":
        inp[3, 0, 0] = float("-inf")
    elif pattern == "huge":
        inp[HUGE_ROW, 3, 2] = torch.finfo(dtype).max ** 0.5 / 1000
    else:
        mask = torch.randn(NF_BATCH, NF_FEATURES, generator=generator, dtype=torch.float64).to(dtype)
        if pattern == "masknan":
            mask[1, 2] = float("nan")
        elif pattern == "maskinf":
            mask[2, 0] = float("inf")
        else:
            mask[0, 1] = float("-inf")
            mask[3] = float("-inf")
    return inp, mask


def dead_query(mix, inp):
    """Sets a self-attention mixer's weights so that the +inf at ``inp[0, 1, 4]`` leaves feature
    1's query in head 0 nothing but -inf scores, and every other query a finite softmax with zero
    weight on feature 1: in head 0, feature 1's query takes +inf in each component (positive
    weights on element 4) and its key -inf (negative weights), while every other query is
    positive and every other key negative in each component (biases beyond the largest finite
    input times the row's weights). PyTorch's attention gives the dead row zero weights, so the
    value weights' gradients stay finite; a plain softmax gives NaN there."""
    d, hd = NF_MOD_DIM, NF_MOD_DIM // NF_HEADS
    largest = inp[inp.isfinite()].abs().max().double()
    with torch.no_grad():
        weight, bias = mix.attention.in_proj_weight, mix.attention.in_proj_bias
        weight[:hd, 4] = weight[:hd, 4].abs() + 0.5
        weight[d:d + hd, 4] = -(weight[d:d + hd, 4].abs() + 0.5)
        for rows, sign in ((slice(0, hd), 1.0), (slice(d, d + hd), -1.0)):
            reach = weight[rows].double().abs().sum(dim=1) * largest
            bias[rows] = (sign * (1.0 + reach)).to(bias.dtype)
    return mix


def order_dependent(mixer_name, pattern, mix):
    """The ``ignore`` masks of a case: what PyTorch itself does not define. For ``huge`` in the
    attention mixers, the gradients through the saturated softmax: the input gradient of the
    huge element's instance, and every weight gradient (a sum over the batch that includes it).
    Outputs and importance stay defined (a saturated softmax is one-hot, exactly)."""
    if pattern != "huge" or mixer_name not in ATTENTION:
        return None
    grad_input = torch.zeros(NF_BATCH, NF_FEATURES, NF_MOD_DIM, dtype=torch.bool)
    grad_input[HUGE_ROW] = True
    ignore = {"grad.input": grad_input}
    for key, parameter in mix.named_parameters():
        ignore[f"grad.state.{key}"] = torch.ones(parameter.shape, dtype=torch.bool)
    return ignore


def write_nonfinite(out, seed):
    """Writes the NaN/Inf set's 72 fixtures into ``out``; returns how many."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = list(itertools.product(["global", "instance", "cross", "self"], ["float64", "float32"], PATTERNS))
    for index, (mixer, dtype_name, pattern) in enumerate(cases):
        case_seed = 1_000_000 + seed * 10_000 + index
        torch.manual_seed(case_seed)
        generator = torch.Generator().manual_seed(case_seed)
        mix = nonfinite_mixer(mixer, DTYPES[dtype_name])
        inp, mask = nonfinite_case(pattern, DTYPES[dtype_name], generator)
        if pattern == "deadquery" and mixer == "self":
            dead_query(mix, inp)
        ignore = order_dependent(mixer, pattern, mix)
        meta = {"seed": str(seed), "pattern": PATTERNS[pattern]}
        if ignore:
            meta["ignore_reason"] = ORDER_OF_SUMS
        name = f"nonfinite-{mixer}-{dtype_name}-{pattern}.safetensors"
        export_fixture(mix, inp, out / name, mask=mask, seed=index, ignore=ignore, meta=meta)
    return len(cases)


# The trained-scale set.
SCALE_FEATURES, SCALE_HEADS = 16, 4


def scale_mixer(name, mod_dim, scale):
    """A float32 swak mixer whose weights (biases drawn non-zero first) are ``scale`` times their
    initial draw."""
    if name == "global":
        mix = GlobalWeightsMixer(mod_dim, SCALE_FEATURES)
        with torch.no_grad():
            mix.coeffs.copy_(torch.randn(SCALE_FEATURES, dtype=torch.float64))
    elif name == "instance":
        mix = nonzero_biases(InstanceWeightsMixer(mod_dim, SCALE_FEATURES))
    else:
        mix = nonzero_biases(ATTENTION[name](mod_dim, SCALE_HEADS))
    with torch.no_grad():
        for parameter in mix.parameters():
            parameter.mul_(scale)
    return mix


def write_scale(out, seed, scales=(1, 3, 10), small=False):
    """Writes the trained-scale set into ``out`` (``small``: mod_dim 32 and a batch of 8, the
    committed variant); returns how many."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mod_dims, batch = ((32,), 8) if small else ((64, 100, 256), 64)
    cases = list(itertools.product(["global", "instance", "cross", "self"], mod_dims, scales))
    for index, (mixer, mod_dim, scale) in enumerate(cases):
        case_seed = 2_000_000 + seed * 10_000 + index
        torch.manual_seed(case_seed)
        generator = torch.Generator().manual_seed(case_seed)
        mix = scale_mixer(mixer, mod_dim, scale)
        inp = torch.randn(batch, SCALE_FEATURES, mod_dim, generator=generator)
        mask = None
        if small or index % 2 == 0:
            mask = torch.rand(batch, SCALE_FEATURES, generator=generator) < 0.2
            mask[:, 0] = False  # no fully masked row: that is the grid's case
        name = f"scale-{mixer}-float32-d{mod_dim}-x{scale}{'-masked' if mask is not None else ''}.safetensors"
        export_fixture(mix, inp, out / name, mask=mask, seed=index, meta={"seed": str(seed), "scale": str(scale)})
    return len(cases)


def _parser(prog, doc):
    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--out", required=True, help="the folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main_grid(argv=None):
    args = _parser("tch-mix-gen-fixtures", "Write the grid of parity fixtures from swak.").parse_args(argv)
    print(f"seed {args.seed}")
    print(f"wrote {write_grid(args.out, args.seed)} fixtures to {args.out}")


def main_nonfinite(argv=None):
    args = _parser("tch-mix-gen-nonfinite-fixtures", "Write the NaN/Inf parity fixtures from swak.").parse_args(argv)
    print(f"seed {args.seed}")
    print(f"wrote {write_nonfinite(args.out, args.seed)} fixtures to {args.out}")


def main_scale(argv=None):
    parser = _parser("tch-mix-gen-scale-fixtures", "Write the trained-scale parity fixtures from swak.")
    parser.add_argument("--scales", default="1,3,10", help="weight scales, comma-separated")
    parser.add_argument("--small", action="store_true", help="mod_dim 32, batch 8 (the committed variant)")
    args = parser.parse_args(argv)
    scales = tuple(float(s) if "." in s else int(s) for s in args.scales.split(","))
    print(f"seed {args.seed}")
    print(f"wrote {write_scale(args.out, args.seed, scales, args.small)} fixtures to {args.out}")


if __name__ == "__main__":
    import sys
    commands = {"grid": main_grid, "nonfinite": main_nonfinite, "scale": main_scale}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python -m tch_mix_tools.fixtures {{{','.join(commands)}}} --out DIR --seed N")
    commands[sys.argv[1]](sys.argv[2:])
