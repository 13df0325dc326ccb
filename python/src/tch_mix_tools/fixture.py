"""Export a tch-mix parity fixture (format ``tch-mix-fixture/2``) from a swak mixer.

As a library::

    from tch_mix_tools import export_fixture
    export_fixture(model.mix, batch, "mix.safetensors", mask=None)

From the command line, the mixer is rebuilt from its hyper-parameters and loaded (strictly) with
trained weights, e.g. the mixer ``mix`` inside a model saved with ``torch.save(model.state_dict())``::

    tch-mix-export-fixture --mixer instance --mod-dim 16 --n-features 4 --weights model.pt \
        --prefix mix --input batch.pt --out mix.safetensors

The fixture holds ``state.<key>`` for every ``state_dict()`` entry, ``input``, optional ``mask``,
``output`` (eval forward), ``importance`` and, unless ``--no-gradients``, ``cotangent``,
``grad.input`` and ``grad.state.<key>``: the gradients of ``(output * cotangent).sum()``.
For a mixer below float64 it also holds the truth: ``truth.<name>`` for each of those results,
computed by swak in float64 on a float64 copy of the mixer from the same weights, input, mask and
cotangent (metadata ``truth`` = ``float64``), and ``swak_error.<name>`` (a float64 scalar):
swak's largest error from the float64 truth over ``neighbours`` neighbouring problems (metadata
``neighbours``), the same mixer and input with every finite non-zero number of the input and the
weights moved one unit in the last place, up or down at random. ``tch-mix check`` judges
tch-mix by its distance to the truth against swak's own error, the larger of the fixture's and
its neighbours': one computation's rounding error is a draw of luck (two scores rounded the
same way cancel in a softmax), nine draws are a measure of its size. ``ignore.<name>`` (bool,
optional) marks values that depend on the order of floating-point sums, which the check leaves
out.

Outputs are computed with autograd enabled, which keeps PyTorch's attention on its regular
(SDPA) path rather than the inference fast path. Where tch-mix deliberately differs from swak,
the fixture holds tch-mix's defined value, derived from swak's own numbers:

- inputs of more than 3 dimensions for the attention mixers (swak raises): swak runs on the batch
  flattened to 3-D, and its results are reshaped back;
- a fully masked row of an attention mixer (a bool mask all true, or a float mask all -inf):
  swak's importance is NaN there, the fixture's is 0.
"""
import argparse
import copy
import importlib.metadata

import torch
from safetensors.torch import save_file
from swak.pt.mix import (
    CrossAttentionMixer,
    GlobalWeightsMixer,
    InstanceWeightsMixer,
    SelfAttentionMixer,
)

from .save import MIXERS, mixer_metadata

FORMAT = "tch-mix-fixture/2"
DTYPES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


def metadata(mixer) -> dict[str, str]:
    """The fixture's ``__metadata__`` describing a swak mixer: its hyper-parameters as
    ``mixer_metadata`` writes them, the format, the dtype and the versions."""
    return {
        "format": FORMAT,
        **mixer_metadata(mixer),
        "dtype": DTYPES[mixer.dtype],
        "torch_version": torch.__version__,
        "swak_version": importlib.metadata.version("swak"),
    }


NEIGHBOURS = 8
"""How many neighbouring problems measure swak's error where the fixture has a truth."""


def export_fixture(mixer, inp, path, mask=None, *, gradients=True, seed=0, ignore=None, meta=None,
                   neighbours=NEIGHBOURS):
    """Run ``mixer`` (in eval mode) on ``inp`` and write everything tch-mix compares to ``path``.

    ``inp`` is cast to the mixer's dtype and device; ``mask`` (bool, True = ignore the feature,
    or float, added to the attention scores) has the input's shape without the last dimension.
    ``gradients`` adds the gradient block for a cotangent drawn with ``seed``. ``ignore`` maps
    result names (``output``, ``grad.input``, ...) to bool tensors of their shape: True where a
    value depends on the order of floating-point sums and is not to be compared. ``meta`` adds
    entries to the metadata (strings). ``neighbours`` is how many neighbouring problems (drawn
    with ``seed``) measure swak's error beside the fixture's own, for a mixer below float64.
    """
    mixer.eval()
    inp = inp.detach().to(device=mixer.device, dtype=mixer.dtype)
    if mask is not None:
        mask = mask.detach().to(device=mixer.device)
    cotangent = None
    if gradients:
        with torch.no_grad():
            shape = call(mixer.forward, mixer, inp, mask).shape
        generator = torch.Generator().manual_seed(seed)
        cotangent = torch.randn(shape, generator=generator).to(mixer.dtype)
    tensors = {f"state.{k}": v.detach().clone().contiguous() for k, v in mixer.state_dict().items()}
    tensors["input"] = inp.clone().contiguous()
    if mask is not None:
        tensors["mask"] = mask.clone().contiguous()
    if cotangent is not None:
        tensors["cotangent"] = cotangent.contiguous()
    tensors.update(results(mixer, inp, mask, cotangent))
    fixture_meta = metadata(mixer)
    if mixer.dtype != torch.float64:
        # The same computation in float64, from the same (exactly representable) numbers.
        exact = copy.deepcopy(mixer).double()
        exact_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
        exact_cotangent = None if cotangent is None else cotangent.double()
        truth = results(exact, inp.double(), exact_mask, exact_cotangent)
        tensors.update({f"truth.{k}": v for k, v in truth.items()})
        fixture_meta["truth"] = "float64"
        errors = neighbour_errors(mixer, inp, mask, cotangent, neighbours, seed, ignore or {})
        tensors.update({f"swak_error.{k}": v for k, v in errors.items()})
        fixture_meta["neighbours"] = str(neighbours)
    for name, flags in (ignore or {}).items():
        if name not in tensors or name.startswith(("truth.", "state.", "ignore.")):
            raise ValueError(f"ignore: {name!r} is not a result of the fixture")
        if flags.dtype != torch.bool or tuple(flags.shape) != tuple(tensors[name].shape):
            raise ValueError(
                f"ignore[{name!r}]: expected a bool tensor of shape {tuple(tensors[name].shape)}, "
                f"got {flags.dtype} {tuple(flags.shape)}"
            )
        tensors[f"ignore.{name}"] = flags.detach().clone().contiguous()
    fixture_meta.update(meta or {})
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=fixture_meta)


def results(mixer, inp, mask, cotangent):
    """``output``, ``importance`` and, with a cotangent, ``grad.input`` and ``grad.state.<key>``
    of ``mixer`` (in eval mode) on ``inp``, as tch-mix defines them."""
    tensors = {}
    with torch.enable_grad():
        x = inp.clone().requires_grad_(cotangent is not None)
        mixer.zero_grad(set_to_none=True)
        output = call(mixer.forward, mixer, x, mask)
        tensors["output"] = output.detach().clone().contiguous()
        if cotangent is not None:
            (output * cotangent).sum().backward()
            tensors["grad.input"] = grad_or_zeros(x)
            for key, parameter in mixer.named_parameters():
                tensors[f"grad.state.{key}"] = grad_or_zeros(parameter)
    with torch.no_grad():
        importance = call(mixer.importance, mixer, inp, mask)
        if mask is not None and MIXERS[type(mixer)] in ("cross", "self"):
            hidden = mask if mask.dtype == torch.bool else mask.isneginf()
            importance = importance.masked_fill(hidden.all(dim=-1, keepdim=True), 0.0)
        tensors["importance"] = importance.detach().clone().contiguous()
    return tensors


def neighbour_errors(mixer, inp, mask, cotangent, count, seed, ignore):
    """For each result, swak's largest error from the float64 truth over ``count`` neighbouring
    problems: the mixer and input with each finite non-zero number moved by one unit in the last
    place (up or down, drawn with ``seed``), computed in the mixer's dtype and in float64. Over the
    values finite in both and not in ``ignore``; 0 for ``count`` 0."""
    generator = torch.Generator().manual_seed(1_000_003 + seed)
    exact_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    exact_cotangent = None if cotangent is None else cotangent.double()
    worst = {}
    for _ in range(count):
        near = copy.deepcopy(mixer)
        with torch.no_grad():
            for parameter in near.parameters():
                parameter.copy_(nudged(parameter, generator))
        near_inp = nudged(inp, generator)
        rounded = results(near, near_inp, mask, cotangent)
        exact = results(copy.deepcopy(near).double(), near_inp.double(), exact_mask, exact_cotangent)
        for name, value in rounded.items():
            value, truth = value.double(), exact[name]
            judged = value.isfinite() & truth.isfinite()
            if name in ignore:
                judged &= ~ignore[name].to(judged.device)
            error = (value - truth).abs()[judged].max() if judged.any() else torch.tensor(0.0)
            worst[name] = max(worst.get(name, 0.0), error.item())
    names = worst or dict.fromkeys(results(mixer, inp, mask, cotangent), 0.0)
    return {name: torch.tensor(worst.get(name, 0.0), dtype=torch.float64) for name in names}


UNITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def nudged(tensor, generator):
    """``tensor`` with each finite non-zero element moved by one unit in the last place, up or
    down in magnitude at random (an element that would become infinite stays as it is)."""
    units = UNITS[tensor.dtype]
    steps = torch.randint(0, 2, tuple(tensor.shape), generator=generator, dtype=torch.int64) * 2 - 1
    # Adding 1 to the bits of a finite float moves its magnitude up by one unit, whatever its sign.
    moved = (tensor.detach().contiguous().view(units) + steps.to(tensor.device, units)).view(tensor.dtype)
    keep = (tensor == 0) | ~tensor.isfinite() | ~moved.isfinite()
    return torch.where(keep, tensor, moved)


def call(method, mixer, inp, mask):
    """``method(inp, mask)``; for an attention mixer on more than 3-D input, on the flattened batch."""
    if inp.dim() <= 3 or MIXERS[type(mixer)] in ("global", "instance"):
        return method(inp, mask)
    leading = inp.shape[:-2]
    result = method(inp.flatten(0, -3), None if mask is None else mask.flatten(0, -2))
    return result.reshape(*leading, *result.shape[1:])


def grad_or_zeros(tensor):
    """The gradient of a leaf, zeros where it took no part in the loss."""
    grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
    return grad.detach().clone().contiguous()


def build_mixer(args):
    """A swak mixer from command-line hyper-parameters."""
    dtype = {v: k for k, v in DTYPES.items()}[args.dtype]
    common = dict(dropout=args.dropout, skip=args.skip, keep_dim=args.keep_dim, dtype=dtype)
    if args.mixer == "global":
        return GlobalWeightsMixer(args.mod_dim, args.n_features, **common)
    if args.mixer == "instance":
        return InstanceWeightsMixer(args.mod_dim, args.n_features, bias=args.bias, **common)
    cls = CrossAttentionMixer if args.mixer == "cross" else SelfAttentionMixer
    return cls(args.mod_dim, args.n_heads, bias=args.bias, **common)


def load_tensor(path, name):
    """A tensor from a ``torch.save`` file or the entry ``name`` of a safetensors file."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))[name]
    return torch.load(path, weights_only=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tch-mix-export-fixture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixer", required=True, choices=["global", "instance", "cross", "self"])
    parser.add_argument("--mod-dim", type=int, required=True)
    parser.add_argument("--n-features", type=int, default=0, help="global and instance")
    parser.add_argument("--n-heads", type=int, default=1, help="cross and self")
    parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--skip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--keep-dim", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--dtype", choices=list(DTYPES.values()), default="float32")
    parser.add_argument("--weights", help="state dict (torch.save or safetensors) to load strictly")
    parser.add_argument("--prefix", default="", help="the mixer's attribute path in the saved model")
    parser.add_argument("--input", required=True, help="input tensor (torch.save, or 'input' in safetensors)")
    parser.add_argument("--mask", help="padding mask (torch.save, or 'mask' in safetensors)")
    parser.add_argument("--no-gradients", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    mixer = build_mixer(args)
    if args.weights:
        state = load_tensor_file(args.weights)
        if args.prefix:
            dotted = args.prefix + "."
            state = {k[len(dotted):]: v for k, v in state.items() if k.startswith(dotted)}
        mixer.load_state_dict(state, strict=True)
    mask = load_tensor(args.mask, "mask") if args.mask else None
    export_fixture(mixer, load_tensor(args.input, "input"), args.out, mask, gradients=not args.no_gradients)
    print(f"wrote {args.out}")


def load_tensor_file(path):
    """A whole state dict from a ``torch.save`` or safetensors file."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, weights_only=True)


if __name__ == "__main__":
    main()
