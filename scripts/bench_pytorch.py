#!/usr/bin/env python3
"""Time swak's mixers the way ``tch-mix bench`` times tch-mix's, with the same output line.

    bench_pytorch.py --mixer M --mod-dim D --n-features F [--n-heads H] --batch B --dtype T
                     [--device cpu|cuda[:N]] [--reps R] [--threads N]

Eval mode under ``torch.no_grad()`` on a ``(B, F, D)`` input; the median of R calls of forward, of
importance, and of both one after the other (swak has no call that returns both), after warm-up,
device-synchronised on CUDA. Its last line is machine-readable, like tch-mix's.
"""
import argparse
import statistics
import time

import torch
from swak.pt.mix import CrossAttentionMixer, GlobalWeightsMixer, InstanceWeightsMixer, SelfAttentionMixer

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(args, dtype, device):
    if args.mixer == "global":
        return GlobalWeightsMixer(args.mod_dim, args.n_features, device=device, dtype=dtype)
    if args.mixer == "instance":
        return InstanceWeightsMixer(args.mod_dim, args.n_features, device=device, dtype=dtype)
    cls = CrossAttentionMixer if args.mixer == "cross" else SelfAttentionMixer
    return cls(args.mod_dim, args.n_heads, device=device, dtype=dtype)


WARM_UP_S = 0.2  # calls run this long before any is timed, as in tch-mix bench and the peers'


def median_ms(reps, device, call):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start, calls = time.perf_counter(), 0
    while calls < min(max(reps, 2), 5) or time.perf_counter() - start < WARM_UP_S:
        call()
        calls += 1
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixer", required=True, choices=["global", "instance", "cross", "self"])
    parser.add_argument("--mod-dim", type=int, required=True)
    parser.add_argument("--n-features", type=int, required=True)
    parser.add_argument("--n-heads", type=int, default=1)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    mixer = build(args, dtype, device).eval()
    inp = torch.randn(args.batch, args.n_features, args.mod_dim, device=device, dtype=dtype)
    with torch.no_grad():
        forward = median_ms(args.reps, device, lambda: mixer(inp))
        importance = median_ms(args.reps, device, lambda: mixer.importance(inp))
        both = median_ms(args.reps, device, lambda: (mixer(inp), mixer.importance(inp)))
    print(f"swak {args.mixer} input {list(inp.shape)} {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}, torch {torch.__version__}")
    print(f"mixer={args.mixer} batch={args.batch} dtype={args.dtype} device={args.device} "
          f"forward_ms={forward:.4f} importance_ms={importance:.4f} both_ms={both:.4f}")


if __name__ == "__main__":
    main()
