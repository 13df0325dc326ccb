#!/usr/bin/env python3
"""Plot one scripts/bench run: forward latency against batch size, log-log, one panel per mixer,
one line per implementation, and tch-mix's floor on this machine (scripts/bench_table.py's).

    plot_bench.py [RESULTS] [PNG]      # defaults: target/bench/latest.txt, docs/latency.png

Needs matplotlib (`scripts/setup --bench` installs it); draws with the Agg backend.
"""
import io
import sys
from pathlib import Path

import matplotlib
from PIL import Image  # matplotlib's own dependency

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_table import IMPLS, floor_ms, number, read  # noqa: E402

STYLE = {
    "tch-mix": dict(color="C3", marker="o", linewidth=2.2),
    "swak": dict(color="C7", marker="s"),
    "torchscript": dict(color="C0", marker="^"),
    "onnxruntime": dict(color="C2", marker="v"),
}
NAMES = {"tch-mix": "tch-mix", "swak": "swak (PyTorch eager)", "torchscript": "TorchScript (CModule)",
         "onnxruntime": "ONNX Runtime (ort)"}


def main():
    results = sys.argv[1] if len(sys.argv) > 1 else "target/bench/latest.txt"
    png = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/latency.png")
    run, machine, rows, _, _ = read(results)
    mixers = list(dict.fromkeys(m for (_, m, _) in rows))
    batches = sorted({b for (_, _, b) in rows})
    fig, axes = plt.subplots(2, 2, figsize=(9, 7), sharex=True)
    for ax, mixer in zip(axes.flat, mixers):
        for key, _ in IMPLS:
            points = [(b, number(rows.get((key, mixer, b), {}).get("forward_ms"))) for b in batches]
            points = [(b, t) for b, t in points if t]
            if points:
                ax.plot(*zip(*points), label=NAMES[key], **STYLE[key])
        if "copy_gbs" in machine:
            floors = [(b, floor_ms(mixer, b, run, machine)[0]) for b in batches]
            floors = [(b, t) for b, t in floors if t]
            if floors:
                ax.plot(*zip(*floors), color="k", linestyle="--", linewidth=1, label="floor (traffic or GEMM peak)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{mixer}")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
    for ax in axes[1]:
        ax.set_xlabel("batch (instances per call)")
    for ax in axes[:, 0]:
        ax.set_ylabel("forward, median ms")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"swak mixers, mod_dim {run.get('mod_dim')}, {run.get('n_features')} features, "
                 f"{run.get('n_heads')} heads, {run.get('dtype')}, {run.get('device')}, {run.get('threads')} threads "
                 f"({run.get('date', '?')[:10]})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    png.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80)
    # A 64-colour palette: the same picture in a third of the bytes, for a PNG kept in git.
    Image.open(buffer).convert("RGB").quantize(colors=64).save(png, optimize=True)
    print(png)


if __name__ == "__main__":
    main()
