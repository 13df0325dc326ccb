#!/usr/bin/env python3
"""Export swak's mixers as the peers that scripts/bench times against tch-mix.

    export_peers.py --out DIR [--mod-dim 256] [--n-features 16] [--n-heads 4]
                    [--batches 1 16 256 8192] [--seed 12]

For each mixer (global, instance, cross, self), float32, eval mode, seeded random weights, DIR gets:

    {mixer}.weights.safetensors    swak's state dict: the weights every implementation runs with
                                   (biases and global coefficients drawn too, none left at its
                                   constant initial value, so that a check cannot pass by luck)
    {mixer}.{fn}.ts-*.pt           TorchScript, fn = forward or importance (swak's importance
                                   method as a graph of its own): torch.jit.trace on a batch of 2
                                   under torch.no_grad(); the attention mixers traced twice, with
                                   PyTorch's MHA fast path on (ts-fastpath) and off (ts-slowpath),
                                   where the two traces differ; each also as torch.jit.freeze +
                                   torch.jit.optimize_for_inference (*-frozen)
    {mixer}.{fn}.onnx-*.onnx       ONNX with a dynamic batch axis, from the torch.export-based
                                   exporter (onnx-dynamo) and the TorchScript-based one
                                   (onnx-legacy), with the MHA fast path off (its
                                   aten::_native_multi_head_attention has no ONNX export)
    input-{B}.safetensors          "input": a fixed (B, F, D) batch per batch size
    {mixer}.ref-{B}.safetensors    "forward", "importance": swak's eager outputs for that batch

Every peer is checked against the ref files before it is timed (the benchmark binaries do it, at
every batch size, since a trace on a batch of 2 could have kept the 2). A variant that cannot be
exported is reported on stderr and left out; scripts/bench then times what is there.
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer

MIXERS = ["global", "instance", "cross", "self"]


class Importance(torch.nn.Module):
    """swak's ``importance`` method as a module's forward, so that it traces and exports alone."""

    def __init__(self, mixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, inp):
        return self.mixer.importance(inp)


def build(name, args):
    torch.manual_seed(args.seed + MIXERS.index(name))
    if name == "global":
        mixer = GlobalWeightsMixer(args.mod_dim, args.n_features)
    elif name == "instance":
        mixer = InstanceWeightsMixer(args.mod_dim, args.n_features)
    else:
        cls = CrossAttentionMixer if name == "cross" else SelfAttentionMixer
        mixer = cls(args.mod_dim, args.n_heads)
    with torch.no_grad():
        for key, param in mixer.named_parameters():
            if key == "coeffs":
                param.normal_()
            elif key.endswith("bias"):
                param.uniform_(-0.1, 0.1)
    return mixer.eval()


def traced(module, example, fastpath):
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about swak's empty-input branch
            return torch.jit.trace(module, (example,), check_trace=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def frozen(script):
    with torch.no_grad():
        return torch.jit.optimize_for_inference(torch.jit.freeze(script.eval()))


def export_torchscript(name, fn, module, example, out):
    attention = name in ("cross", "self")
    paths = ["fastpath", "slowpath"] if attention else ["trace"]
    graphs = set()
    for path in paths:
        try:
            script = traced(module, example, fastpath=(path != "slowpath"))
        except Exception as err:  # noqa: BLE001 - report and go on with the other variants
            print(f"export_peers: {name}.{fn} ts-{path}: trace failed: {err}", file=sys.stderr)
            continue
        graph = tuple(node.kind() for node in script.inlined_graph.nodes())
        if graph in graphs:  # the fast path did not apply: the same ops twice
            continue
        graphs.add(graph)
        script.save(str(out / f"{name}.{fn}.ts-{path}.pt"))
        try:
            frozen(script).save(str(out / f"{name}.{fn}.ts-{path}-frozen.pt"))
        except Exception as err:  # noqa: BLE001
            print(f"export_peers: {name}.{fn} ts-{path}-frozen: {err}", file=sys.stderr)


def export_onnx(name, fn, module, example, out):
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for exporter in ("dynamo", "legacy"):
            path = out / f"{name}.{fn}.onnx-{exporter}.onnx"
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if exporter == "dynamo":
                        batch = torch.export.Dim("batch")
                        torch.onnx.export(module, (example,), str(path), input_names=["inp"],
                                          output_names=["out"], dynamo=True, external_data=False,
                                          dynamic_shapes={"inp": {0: batch}}, verbose=False)
                    else:
                        torch.onnx.export(module, (example,), str(path), input_names=["inp"],
                                          output_names=["out"], dynamo=False,
                                          dynamic_axes={"inp": {0: "batch"}, "out": {0: "batch"}})
            except Exception as err:  # noqa: BLE001
                print(f"export_peers: {name}.{fn} onnx-{exporter}: {err}", file=sys.stderr)
                path.unlink(missing_ok=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mod-dim", type=int, default=256)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 8192])
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in [*args.out.glob("*.pt"), *args.out.glob("*.onnx"), *args.out.glob("*.safetensors")]:
        old.unlink()  # a variant that no longer exports must not be timed from an earlier run
    shape = (args.n_features, args.mod_dim)

    inputs = {}
    for batch in args.batches:
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + batch)
        inputs[batch] = torch.randn(batch, *shape, generator=generator)
        save_file({"input": inputs[batch]}, str(args.out / f"input-{batch}.safetensors"))

    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(args.seed))
    for name in MIXERS:
        mixer = build(name, args)
        save_file({k: v.contiguous() for k, v in mixer.state_dict().items()},
                  str(args.out / f"{name}.weights.safetensors"))
        with torch.no_grad():  # swak as users run it: eager, fast path on where PyTorch takes it
            for batch, inp in inputs.items():
                save_file({"forward": mixer(inp).contiguous(), "importance": mixer.importance(inp).contiguous()},
                          str(args.out / f"{name}.ref-{batch}.safetensors"))
        for fn, module in (("forward", mixer), ("importance", Importance(mixer).eval())):
            export_torchscript(name, fn, module, example, args.out)
            export_onnx(name, fn, module, example, args.out)
        print(f"export_peers: {name}: " + " ".join(sorted(p.name.split(".", 1)[1] for p in args.out.glob(f"{name}.*")
                                                          if p.suffix in (".pt", ".onnx"))), file=sys.stderr)


if __name__ == "__main__":
    main()
