#!/usr/bin/env python3
"""Train the demo's small swak models and write what examples/demo.rs loads.

Synthetic task: 6 features of size 8 per instance, each standard normal noise ``z`` around a fixed
per-feature offset (its identity, as a per-feature embedder would give it); the target is
``z[1, 0] + z[4, 0]``, so only features 1 and 4 carry signal. Each model is one swak mixer
(``mix``, skip=False) followed by ``head = Linear(8, 1)``, trained with Adam on MSE.

Writes to examples/demo/ (or --out):
- ``<mixer>.pt``: ``torch.save(model.state_dict())``, keys ``mix.*`` and ``head.*``;
- ``<mixer>.fixture.safetensors``: a tch-mix fixture of the trained mixer on a fresh batch of 64.
"""
import argparse
import pathlib

import torch
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer

from tch_mix_tools import export_fixture

N_FEATURES, MOD_DIM, INFORMATIVE = 6, 8, (1, 4)
MIXERS = {
    "global": lambda: GlobalWeightsMixer(MOD_DIM, N_FEATURES, skip=False),
    "instance": lambda: InstanceWeightsMixer(MOD_DIM, N_FEATURES, skip=False),
    "cross": lambda: CrossAttentionMixer(MOD_DIM, n_heads=2, skip=False),
    "self": lambda: SelfAttentionMixer(MOD_DIM, n_heads=2, skip=False),
}


class Model(torch.nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.mix = mix
        self.head = torch.nn.Linear(MOD_DIM, 1)

    def forward(self, inp):
        return self.head(self.mix(inp)).squeeze(-1)


OFFSETS = 2.0 * torch.randn(N_FEATURES, MOD_DIM, generator=torch.Generator().manual_seed(42))


def batch(size, generator):
    noise = torch.randn(size, N_FEATURES, MOD_DIM, generator=generator)
    return noise + OFFSETS, sum(noise[:, f, 0] for f in INFORMATIVE)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "demo"))
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in MIXERS.items():
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model = Model(make())
        optimizer = torch.optim.Adam(model.parameters(), lr=0.005)
        for _ in range(args.steps):
            inp, target = batch(256, generator)
            loss = torch.nn.functional.mse_loss(model(inp), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        inp, target = batch(64, generator)
        with torch.no_grad():
            test_loss = torch.nn.functional.mse_loss(model(inp), target).item()
            importance = model.mix.importance(inp).mean(0)
        torch.save(model.state_dict(), out / f"{name}.pt")
        export_fixture(model.mix, inp, out / f"{name}.fixture.safetensors", gradients=False)
        shares = " ".join(f"{w:.2f}" for w in importance.tolist())
        print(f"{name:<8} test mse {test_loss:.4f} (target variance 2.0); mean importance {shares}")


if __name__ == "__main__":
    main()
