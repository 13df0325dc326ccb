"""Save a swak model's weights with the hyper-parameters of its mixers, as tch-mix reads them.

As a library::

    from tch_mix_tools import save, add_metadata, metadata
    save(model, "model.safetensors")     # the state dict and its mixers' metadata
    save(model, "model.pt")              # torch.save(model.state_dict()) plus the metadata entry
    add_metadata("checkpoint.pt", model) # into any torch.save file, e.g. a swak Checkpoint

From the command line, to add the metadata of a model's mixers to a file already written::

    tch-mix-save add-metadata checkpoint.pt --mixer mix=cross --mod-dim 16 --n-heads 4

The metadata is a flat dict of strings, one entry per hyper-parameter of each swak mixer in the
model: ``tch_mix.<name>.<field>`` for the mixer at ``model.<name>`` (``tch_mix.<field>`` for a
mixer saved on its own), with the fields ``mixer`` (``global``, ``instance``, ``cross``,
``self``), ``mod_dim``, ``n_features`` (global, instance), ``n_heads`` (cross, self), ``bias``
(instance, cross, self), ``dropout``, ``skip``, ``keep_dim``; numbers as Python writes them,
bools as ``true``/``false``. A safetensors file carries it as its ``__metadata__``; a
``torch.save`` zip archive as the JSON of the same dict in its entry ``<top>/tch_mix.json``,
which ``torch.load`` never reads (it reads the entries its pickle names). In a checkpoint that
holds the state dict under ``model`` (swak's ``Checkpoint``), the names are relative to that
state dict. tch-mix refuses to load the weights of a mixer into one of other hyper-parameters.
"""
import argparse
import json
import os
import zipfile

import torch
from safetensors.torch import save_file
from swak.pt.mix import (
    CrossAttentionMixer,
    GlobalWeightsMixer,
    InstanceWeightsMixer,
    SelfAttentionMixer,
)

PREFIX = "tch_mix"
ENTRY = "tch_mix.json"
MIXERS = {
    GlobalWeightsMixer: "global",
    InstanceWeightsMixer: "instance",
    CrossAttentionMixer: "cross",
    SelfAttentionMixer: "self",
}


def mixer_metadata(mixer) -> dict[str, str]:
    """The hyper-parameters of one swak mixer, unprefixed (``mixer``, ``mod_dim``, ...)."""
    name = MIXERS[type(mixer)]
    meta = {
        "mixer": name,
        "mod_dim": str(mixer.mod_dim),
        "dropout": repr(float(mixer.dropout)),
        "skip": str(bool(mixer.skip)).lower(),
        "keep_dim": str(bool(mixer.keep_dim)).lower(),
    }
    if name in ("global", "instance"):
        meta["n_features"] = str(mixer.n_features)
    if name != "global":
        meta["bias"] = str(bool(mixer.bias)).lower()
    if name in ("cross", "self"):
        meta["n_heads"] = str(mixer.n_heads)
    return meta


def metadata(model: torch.nn.Module) -> dict[str, str]:
    """The metadata of every swak mixer in ``model`` (the model itself included)."""
    meta = {}
    for name, module in model.named_modules():
        if type(module) in MIXERS:
            base = f"{PREFIX}.{name}" if name else PREFIX
            meta.update({f"{base}.{k}": v for k, v in mixer_metadata(module).items()})
    return meta


def _replace_atomically(path, write):
    """Calls ``write(temporary path)``, then renames the temporary file to ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(model_or_state, path, meta=None):
    """Save a model's (or a state dict's) weights to ``path`` with the metadata of its mixers.

    ``model_or_state`` is a ``torch.nn.Module`` (its ``state_dict()`` is saved, and ``meta``
    defaults to ``metadata(model)``) or a state dict (then pass ``meta`` yourself, e.g.
    ``metadata(model)``). ``.safetensors`` gives safetensors, ``.pt``/``.pth`` ``torch.save``'s
    format with the metadata entry; the file is written atomically.
    """
    if isinstance(model_or_state, torch.nn.Module):
        state = model_or_state.state_dict()
        meta = metadata(model_or_state) if meta is None else meta
    else:
        state = model_or_state
        meta = {} if meta is None else meta
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        _replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta or None))
    elif path.endswith((".pt", ".pth")):
        def write(tmp):
            with open(tmp, "wb") as file:  # a file object: the archive's folder is "archive"
                torch.save(state, file)
            if meta:
                add_metadata(tmp, meta)
        _replace_atomically(path, write)
    else:
        raise ValueError(f"{path}: use .safetensors, .pt or .pth")


def add_metadata(path, model_or_meta):
    """Append the metadata entry to a ``torch.save`` zip archive (a state dict or a checkpoint
    such as swak's ``Checkpoint``), from a model's mixers or a ready dict of strings."""
    if isinstance(model_or_meta, torch.nn.Module):
        meta = metadata(model_or_meta)
    else:
        meta = dict(model_or_meta)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    top = names[0].split("/")[0]
    if f"{top}/{ENTRY}" in names:
        raise ValueError(f"{path} already holds {top}/{ENTRY}")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{top}/{ENTRY}", json.dumps(meta, sort_keys=True))


def read_metadata(path) -> dict[str, str]:
    """The metadata a file carries ({} if none): safetensors or a torch.save zip archive."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            top = archive.namelist()[0].split("/")[0]
            try:
                return json.loads(archive.read(f"{top}/{ENTRY}"))
            except KeyError:
                return {}
    from safetensors import safe_open
    with safe_open(path, "pt") as file:
        return file.metadata() or {}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tch-mix-save", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-metadata", help="add one mixer's metadata to a torch.save file")
    add.add_argument("file")
    add.add_argument("--mixer", required=True,
                     help="NAME=KIND: the mixer's attribute path in the model ('' for the root) and "
                          "its class: global, instance, cross or self")
    add.add_argument("--mod-dim", type=int, required=True)
    add.add_argument("--n-features", type=int)
    add.add_argument("--n-heads", type=int, default=1)
    add.add_argument("--no-bias", action="store_true")
    add.add_argument("--dropout", type=float, default=0.0)
    add.add_argument("--no-skip", action="store_true")
    add.add_argument("--keep-dim", action="store_true")
    args = parser.parse_args(argv)
    name, _, kind = args.mixer.rpartition("=")
    classes = {v: k for k, v in MIXERS.items()}
    options = dict(dropout=args.dropout, skip=not args.no_skip, keep_dim=args.keep_dim)
    if kind in ("global", "instance"):
        if args.n_features is None:
            parser.error(f"--n-features is needed for {kind}")
        if kind == "instance":
            options["bias"] = not args.no_bias
        mixer = classes[kind](args.mod_dim, args.n_features, **options)
    elif kind in ("cross", "self"):
        mixer = classes[kind](args.mod_dim, n_heads=args.n_heads, bias=not args.no_bias, **options)
    else:
        parser.error(f"--mixer: unknown class {kind!r}")
    base = f"{PREFIX}.{name}" if name else PREFIX
    add_metadata(args.file, {f"{base}.{k}": v for k, v in mixer_metadata(mixer).items()})
    print(f"{args.file}: added {base}.*")


if __name__ == "__main__":
    main()
