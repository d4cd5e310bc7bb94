"""The results as a figure: top-1 against images per class, one panel per dataset and schedule, drawn from
docs/results.json alone (so it redraws whenever rows change).

    python misc/results_figure.py                      # writes figs/results.png
    python misc/results_figure.py --out /tmp/r.png

ConvNet-3, the epoch chosen on held-out real training images; DiM fixed set, DiM on the fly and the random
real subset against ipc (log axis), the full training set as a horizontal line; hard labels solid, a
teacher's soft labels dashed; the mean over the seeds with a band of ± one standard deviation. DiM is the
dataset's last stage (stages 1+2 where stage 2 ran). Sets chosen by k-means (RESULTS.md has their table)
rows of outdated code (misc/results.py, OUTDATED_COMMITS) and variant schedules (cpu-3x) are left out.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from misc.readme_table import ORDER  # noqa: E402
from misc.results import is_current, stands_alone  # noqa: E402

RESULTS_JSON = os.path.join(ROOT, 'docs', 'results.json')
FIGURE = os.path.join(ROOT, 'figs', 'results.png')
ARCH, SELECTION = 'convnet', 'held-out'
# the curves: label, what a record of it matches, colour
KINDS = [('DiM, fixed set', dict(method='dim', protocol='fixed'), 'tab:blue'),
         ('DiM, on the fly', dict(method='dim', protocol='onthefly'), 'tab:orange'),
         ('random real subset', dict(method='random'), 'tab:green')]
STYLES = {'hard': '-', 'soft': '--'}


def panels(records):
    """{(dataset, schedule): its records}, ConvNet-3, held-out selection, sets drawn at random, in the
    README table's dataset order."""
    mine = [r for r in records if r['arch'] == ARCH and r['selection'] == SELECTION
            and r.get('select') in (None, 'random') and is_current(r) and stands_alone(r)]
    keys = sorted({(r['dataset'], r['schedule']['name']) for r in mine},
                  key=lambda k: (k[1] != 'paper', ORDER.index(k[0]) if k[0] in ORDER else len(ORDER), k))
    return {k: [r for r in mine if (r['dataset'], r['schedule']['name']) == k] for k in keys}


def series(records, labels, **match):
    """(ipcs, means, stds) of the records that fit, sorted by ipc."""
    hits = sorted((r for r in records if r.get('labels', 'hard') == labels
                   and all(r.get(k) == v for k, v in match.items()) and r['ipc'] is not None),
                  key=lambda r: r['ipc'])
    return [r['ipc'] for r in hits], [r['mean'] for r in hits], [r['std'] for r in hits]


def draw(results, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    groups = panels(results['records'])
    if not groups:
        raise SystemExit(f'error: {RESULTS_JSON} has no ConvNet-3 rows with held-out selection to draw')
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.9), squeeze=False)
    seeds = set()
    for ax, ((dataset, schedule), records) in zip(axes[0], groups.items()):
        seeds |= {tuple(r['seeds']) for r in records}
        stages = '1+2' if any(r['stages'] == '1+2' for r in records) else '1'
        for name, match, colour in KINDS:
            match = {**match, 'stages': stages} if match['method'] == 'dim' else match
            for labels, style in STYLES.items():
                ipcs, means, stds = series(records, labels, **match)
                if not ipcs:
                    continue
                means, stds = np.array(means), np.array(stds)
                ax.plot(ipcs, means, style, marker='o', markersize=4, color=colour, label=f'{name}, {labels}')
                ax.fill_between(ipcs, means - stds, means + stds, color=colour, alpha=0.15, linewidth=0)
        full = [r for r in records if r['method'] == 'full' and r.get('labels', 'hard') == 'hard']
        if full:
            ax.axhline(full[0]['mean'], color='black', linewidth=1, linestyle=':', label='full training set, hard')
        ax.set_xscale('log')
        ax.set_xticks([1, 10, 50])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel('images per class (ipc)')
        ax.set_title(f"{dataset}, {schedule} schedule, DiM stage{'s' if stages == '1+2' else ''} {stages}",
                     fontsize=10)
        ax.grid(True, which='major', alpha=0.3)
    axes[0][0].set_ylabel('top-1 (%) on the real test set')
    handles, names = [], []
    for ax in axes[0]:  # one legend for the figure: every curve any panel has
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc='lower center', bbox_to_anchor=(0.5, 0.035), ncol=4, fontsize=8, frameon=False)
    runs = ', '.join(map(str, sorted(seeds)[0])) if len(seeds) == 1 else 'per row, see results.json'
    fig.text(0.5, 0.005, f'ConvNet-3; mean ± std over seeds ({runs}), each seed on its own draw of the set; the epoch '
             'is chosen on held-out real training images, never the test set.', ha='center', fontsize=8)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110, metadata={'Software': None})  # no version stamp: redraws compare byte for byte
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--results', default=RESULTS_JSON, help='the results file to draw (default: docs/results.json)')
    p.add_argument('--out', default=FIGURE, help='the PNG to write (default: figs/results.png)')
    args = p.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    print(f'wrote {draw(results, args.out)}')


if __name__ == '__main__':
    main()
