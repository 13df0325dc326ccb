"""The table and plot of `CONCURRENCY=1 scripts/bench`: throughput and latency of concurrent
callers, tch-mix (the library's defaults, and the best of the defaults and
`set_num_threads(1)` in every caller) against ONNX Runtime.

    python scripts/plot_concurrency.py target/bench/concurrency.txt [--png FILE]

Prints one Markdown table (a row per mixer, batch and number of callers) and, with `--png`,
plots calls per second against callers, one panel per mixer and batch.
"""

import argparse
import sys
from collections import defaultdict


def parse(path):
    """{(mixer, batch): {callers: {setting: (calls_per_s, p50_us, p99_us)}}}."""
    cells = defaultdict(lambda: defaultdict(dict))
    with open(path) as lines:
        for line in lines:
            if not line.startswith('concurrency '):
                continue
            fields = dict(f.split('=', 1) for f in line.split()[1:])
            key = (fields['mixer'], int(fields['batch']))
            cells[key][int(fields['callers'])][fields['setting']] = (
                float(fields['calls_per_s']),
                float(fields['p50_us']),
                float(fields['p99_us']),
            )
    return cells


def best_tuned(settings):
    """The faster of tch-mix's two settings."""
    tuned = [settings[s] for s in ('default', '1-thread') if s in settings]
    return max(tuned, key=lambda t: t[0]) if tuned else None


def table(cells):
    out = [
        '| mixer | batch | callers | tch-mix calls/s | p50 / p99 us | best tuned calls/s | '
        'ONNX Runtime calls/s | p50 / p99 us | tch-mix / ORT |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    order = ['global', 'instance', 'cross', 'self']
    for mixer, batch in sorted(cells, key=lambda k: (order.index(k[0]), k[1])):
        for callers, settings in sorted(cells[(mixer, batch)].items()):
            ours, ort = settings.get('default'), settings.get('onnxruntime')
            best = best_tuned(settings)
            cell = lambda t: f'{t[0]:,.0f}' if t else '-'
            lat = lambda t: f'{t[1]:.0f} / {t[2]:.0f}' if t else '-'
            ratio = f'{ours[0] / ort[0]:.2f}x' if ours and ort else '-'
            out.append(
                f'| {mixer} | {batch} | {callers} | {cell(ours)} | {lat(ours)} | {cell(best)} | '
                f'{cell(ort)} | {lat(ort)} | {ratio} |'
            )
    return '\n'.join(out)


def plot(cells, png):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    keys = sorted(cells, key=lambda k: (['global', 'instance', 'cross', 'self'].index(k[0]), k[1]))
    mixers = sorted({k[0] for k in keys}, key=['global', 'instance', 'cross', 'self'].index)
    batches = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(
        len(batches), len(mixers), figsize=(3.2 * len(mixers), 2.6 * len(batches)), squeeze=False
    )
    styles = {
        'default': ('tch-mix, defaults', '-', 'o'),
        '1-thread': ('tch-mix, set_num_threads(1)', ':', 's'),
        'onnxruntime': ('ONNX Runtime', '--', '^'),
    }
    for row, batch in enumerate(batches):
        for col, mixer in enumerate(mixers):
            ax = axes[row][col]
            data = cells.get((mixer, batch), {})
            for setting, (label, line, marker) in styles.items():
                points = [(n, s[setting][0]) for n, s in sorted(data.items()) if setting in s]
                if points:
                    ax.plot(*zip(*points), line, marker=marker, label=label)
            ax.set_xscale('log', base=2)
            ax.set_title(f'{mixer}, batch {batch}', fontsize=9)
            ax.set_ylim(bottom=0)
            ax.tick_params(labelsize=7)
            if row == len(batches) - 1:
                ax.set_xlabel('callers', fontsize=8)
            if col == 0:
                ax.set_ylabel('calls/s', fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('results')
    parser.add_argument('--png')
    args = parser.parse_args()
    cells = parse(args.results)
    if not cells:
        sys.exit(f'{args.results}: no concurrency lines')
    print(table(cells))
    if args.png:
        plot(cells, args.png)
        print(f'plot: {args.png}', file=sys.stderr)


if __name__ == '__main__':
    main()
