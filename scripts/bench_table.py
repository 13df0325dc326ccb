#!/usr/bin/env python3
"""Render one scripts/bench run (its machine-readable lines) as one Markdown table.

    bench_table.py [RESULTS]        # default target/bench/latest.txt

Per mixer and batch: the medians (ms) of forward / importance / both for tch-mix, swak eager,
TorchScript and ONNX Runtime; the ratio of the fastest peer to tch-mix for each of the three; the
floor of tch-mix's forward on this machine and tch-mix's distance to it. Standard library only.

The floor of a forward call is the larger of two lower bounds:
  memory   the input read once and the output written once, (B F D + B D) float32 values, at the
           faster of two measured bandwidths: a 256 MiB copy's (bytes read + bytes written per
           second: memory's), and a Tensor::sum's over a tensor of the input's size repeated as the
           bench repeats its input (so an input that stays in the caches is held to the caches'
           bandwidth, and a tiny one to what one libtorch reduction over it costs)
  compute  the multiply-adds of the cheapest exact formulation known (the one tch-mix uses), all
           counted at the measured sgemm peak, though only the projections are GEMMs:
             global    2 B F D                                  (weighted sum)
             instance  2 B F D F + 2 B F D                      (scores from the (F D) -> F projection, pooling)
             cross     4 B H F D + 4 B D^2                      (folded scores and pooling per head; value and output projections)
             self      4 B F D^2 + 2 B F^2 D + 2 B H F D + 4 B D^2   (query/key projection, scores, pooling, value and output projections)
It leaves out what a call costs besides arithmetic and traffic (dispatch, thread wake-ups), so at
small batches it is far below any implementation; the weights are taken to stay in the caches.
"""
import signal
import sys
from pathlib import Path

IMPLS = [("tch-mix", "tch-mix"), ("swak", "swak"), ("torchscript", "TorchScript"), ("onnxruntime", "ORT")]
PEERS = ["swak", "torchscript", "onnxruntime"]
SHORT = {"swak": "swak", "torchscript": "TS", "onnxruntime": "ORT"}


def fields(line):
    out = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            out.setdefault(key, value)
    return out


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read(path):
    run, machine, rows, variants, end, copies = {}, {}, {}, [], {}, {}
    for line in Path(path).read_text().splitlines():
        f = fields(line)
        if line.startswith("run "):
            run = f
        elif line.startswith("machine "):
            machine = f
        elif line.startswith("read "):
            copies[int(f["elements"])] = float(f["gbs"])
        elif line.startswith("end "):
            end = f
        elif line.startswith("row "):  # what the rest of the machine used while the row ran
            rows[("row", f["mixer"], int(f["batch"]))] = f
        elif "impl" in f and "variant" in f:
            variants.append(f)
        elif "impl" in f:
            f["line"] = line
            rows[(f["impl"], f["mixer"], int(f["batch"]))] = f
    machine["copies"] = copies
    return run, machine, rows, variants, end


def flops(mixer, b, f, d, h):
    return {
        "global": 2 * b * f * d,
        "instance": 2 * b * f * d * f + 2 * b * f * d,
        "cross": 4 * b * h * f * d + 4 * b * d * d,
        "self": 4 * b * f * d * d + 2 * b * f * f * d + 2 * b * h * f * d + 4 * b * d * d,
    }[mixer]


def floor_ms(mixer, batch, run, machine):
    f, d, h = int(run["n_features"]), int(run["mod_dim"]), int(run["n_heads"])
    bandwidth = max(machine["copies"].get(batch * f * d, 0), number(machine.get("copy_gbs")) or 0)
    peak = number(machine.get("sgemm_gflops"))
    if not bandwidth or not peak:  # no machine line: not measured (no peers, or not the CPU)
        return None, None
    memory = 4 * (batch * f * d + batch * d) / (bandwidth * 1e9) * 1e3
    compute = flops(mixer, batch, f, d, h) / (peak * 1e9) * 1e3
    return max(memory, compute), "memory" if memory >= compute else "compute"


def load_range(run, rows, end):
    loads = [number(v) for v in [run.get("load_start"), end.get("load_end")] + [r.get("load") for r in rows.values()]]
    loads = [x for x in loads if x is not None]
    return f"{min(loads):.2f} to {max(loads):.2f}" if loads else "?"


def ms(value):
    if value is None:
        return "-"
    if value < 0.1:
        return f"{value:.4f}"
    if value < 10:
        return f"{value:.3f}"
    return f"{value:.1f}"


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    path = sys.argv[1] if len(sys.argv) > 1 else "target/bench/latest.txt"
    run, machine, rows, variants, end = read(path)
    mixers = list(dict.fromkeys(m for (_, m, _) in rows))
    batches = sorted({b for (_, _, b) in rows})
    impls = [(key, name) for key, name in IMPLS if any(k == key for (k, _, _) in rows)]
    peers = [key for key in PEERS if any(k == key for (k, _, _) in rows)]

    print(f"tch-mix {run.get('commit', '?')} against swak {run.get('swak', '?')} on torch {run.get('torch', '?')}"
          + (f", TorchScript (tch::CModule) and ONNX Runtime {run.get('onnxruntime')} (ort crate)" if peers != ["swak"] else "")
          + f"; {run.get('device', '?')}, {run.get('dtype', '?')}, {run.get('threads', '?')} threads, "
          f"{run.get('cores', '?')} cores, 1-minute load average {load_range(run, rows, end)} during the run; "
          "medians in ms, forward / importance / both")
    if "copy_gbs" in machine:
        sizes = ", ".join(f"{gbs:.0f} GB/s at {n * 4 / 2**20:g} MiB" for n, gbs in sorted(machine["copies"].items()))
        print(f"Machine ({machine.get('threads', '?')} threads, best of repeated calls): sgemm peak "
              f"{machine['sgemm_gflops']} GFLOP/s; copy of 256 MiB {machine['copy_gbs']} GB/s (read + write)"
              + (f"; Tensor::sum read {sizes}" if sizes else ""))
    print()
    head = ["mixer", "batch"] + [f"{name}" for _, name in impls]
    if peers:
        head.append("fastest peer / tch-mix (fwd · imp · both)")
    if "copy_gbs" in machine:
        head += ["floor (bound)", "tch-mix fwd / floor"]
    head.append("tch-mix peak extra MiB (input MiB)")
    head.append("others' CPU (cores)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for mixer in mixers:
        for batch in batches:
            cells = [mixer, str(batch)]
            for key, _ in impls:
                row = rows.get((key, mixer, batch), {})
                values = [number(row.get(f"{what}_ms")) for what in ("forward", "importance", "both")]
                cells.append(" / ".join(ms(v) for v in values) if values[0] is not None else "failed")
            ours = rows.get(("tch-mix", mixer, batch), {})
            if peers:
                ratios = []
                for what in ("forward", "importance", "both"):
                    mine = number(ours.get(f"{what}_ms"))
                    timed = [(number(rows.get((p, mixer, batch), {}).get(f"{what}_ms")), p) for p in peers]
                    timed = [(t, p) for t, p in timed if t is not None]
                    if mine and timed:
                        best, who = min(timed)
                        ratios.append(f"{best / mine:.2f}x {SHORT[who]}")
                    else:
                        ratios.append("-")
                cells.append(" · ".join(ratios))
            if "copy_gbs" in machine:
                floor, bound = floor_ms(mixer, batch, run, machine)
                mine = number(ours.get("forward_ms"))
                cells.append(f"{ms(floor)} ({bound})" if floor else "-")
                cells.append(f"{mine / floor:.1f}x" if floor and mine else "-")
            cells.append(f"{ours.get('forward_peak_extra_mib', '-')} ({ours.get('input_mib', '-')})")
            cells.append(rows.get(("row", mixer, batch), {}).get("others_cores", "-"))
            print("| " + " | ".join(cells) + " |")

    print()
    print("Both: tch-mix's forward_and_importance in one call; swak and the peers call forward, then importance.")
    print("Others' CPU: the busy CPU time of the whole VM (steal included) less the bench's own, per second of the row.")
    failed = [r["line"] for (k, _, _), r in rows.items() if k != "row" and number(r.get("forward_ms")) is None]
    for line in failed:
        print(f"FAILED: {line}")
    for key in ("tch-mix", "torchscript", "onnxruntime"):
        errs = [number(r.get(e)) for (k, _, _), r in rows.items() if k == key
                for e in ("forward_err", "importance_err")]
        errs = [e for e in errs if e is not None]
        if errs:
            print(f"{dict(IMPLS)[key]}: every output checked against swak's before timing, "
                  f"worst max|diff| / max|swak| {max(errs):.1e}")
    refused = [v for v in variants if "ms" not in v]
    for v in refused:
        print(f"refused (not timed): {v['impl']} {v['mixer']} batch {v['batch']} {v['variant']} {v['function']}")
    for key in ("torchscript", "onnxruntime"):
        counted = {}
        for (k, mixer, batch), r in rows.items():
            if k == key and "forward_variant" in r:
                counted.setdefault(mixer, []).append(f"{batch}: {r['forward_variant']}, {r['importance_variant']}")
        if counted:
            print(f"{dict(IMPLS)[key]} variants that counted (forward, importance): "
                  + "; ".join(f"{m} " + " / ".join(v) for m, v in counted.items()))


if __name__ == "__main__":
    main()
