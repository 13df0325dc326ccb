#!/usr/bin/env python3
"""The Python job of "Parity in your CI": train a model with a swak mixer, save its weights for
the Rust service, and export parity fixtures of its mixer with ``tch_mix_tools``.

    python examples/ci_parity/train_and_export.py --out DIR [--steps 60] [--seed 0]

The model: a per-feature embedding of 16 features into 64 dimensions (``(B, 16, 64)``), one swak
mixer ``mix`` per kind, and a linear head, trained with Adam at a high learning rate on a
synthetic regression, so that the weights grow well past their initial scale, as training makes
them. For each mixer it writes ``DIR/<mixer>.safetensors`` (the model's weights with the mixers'
metadata, ``tch_mix_tools.save``) and ``DIR/<mixer>.fixture.safetensors`` (the trained mixer on
a fresh batch, with a padding mask, ``tch_mix_tools.export_fixture``), and prints how much the
mixer's weights grew. The Rust job, ``cargo run --example ci_parity -- DIR``, checks them.
"""
import argparse
import pathlib

import torch
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer

import tch_mix_tools

N_FEATURES, MOD_DIM, BATCH = 16, 64, 32
MIXERS = {
    "global": lambda: GlobalWeightsMixer(MOD_DIM, N_FEATURES),
    "instance": lambda: InstanceWeightsMixer(MOD_DIM, N_FEATURES),
    "cross": lambda: CrossAttentionMixer(MOD_DIM, n_heads=4),
    "self": lambda: SelfAttentionMixer(MOD_DIM, n_heads=4),
}


class Model(torch.nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(N_FEATURES, MOD_DIM))
        self.mix = mix
        self.head = torch.nn.Linear(MOD_DIM, 1)

    def features(self, x):
        return x.unsqueeze(-1) * self.embed  # (B, F) -> (B, F, D)

    def forward(self, x, mask=None):
        return self.head(self.mix(self.features(x), mask)).squeeze(-1)


def weight_norm(module):
    return sum(p.detach().double().norm() ** 2 for p in module.parameters()) ** 0.5


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"seed {args.seed}")
    for name, make in MIXERS.items():
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        model = Model(make())
        start = weight_norm(model.mix)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(args.steps):
            x = torch.randn(BATCH, N_FEATURES, generator=generator)
            target = 3.0 * x[:, 1] - 2.0 * x[:, 7] * x[:, 3]
            loss = torch.nn.functional.mse_loss(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        tch_mix_tools.save(model, out / f"{name}.safetensors")
        x = torch.randn(BATCH, N_FEATURES, generator=generator)
        mask = torch.rand(BATCH, N_FEATURES, generator=generator) < 0.2
        with torch.no_grad():
            features = model.features(x)
        tch_mix_tools.export_fixture(model.mix, features, out / f"{name}.fixture.safetensors", mask=mask)
        grown = weight_norm(model.mix) / start
        print(f"{name}: trained {args.steps} steps, loss {loss.item():.3g}, mixer weights {grown:.1f}x their initial norm")


if __name__ == "__main__":
    main()
