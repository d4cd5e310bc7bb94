"""Print several validate.py reports (results/<tag>/eval.json) as one markdown table.

    python misc/compare.py results/quickstart-test/eval.json results/quickstart-random/eval.json
    python misc/compare.py --brief --diagnose results/quickstart-diagnose/diagnose.json results/quickstart-*/eval.json

The default table has every column of each report. --brief prints one row per report and one column per
classifier (final top-1), with how many distinct images each training saw and, with --diagnose (a
misc/diagnose.py report of the same generator checkpoint), how often that generator draws the class it
is asked for. When any report trained on a teacher's soft labels (validate.py --soft-labels), both tables
get a labels column (hard, or soft with the temperature; reports from before soft labels are hard), so
hard and soft rows stand side by side; sets chosen by k-means (validate.py --select kmeans) say so in
their method or row name.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.evaluate import iterations_per_epoch  # noqa: E402
from validate import SOFT_CELL, markdown_table  # noqa: E402


def any_soft(reports):
    return any(report.get('labels', 'hard') == 'soft' for report in reports)


def labels_cell(report):
    return SOFT_CELL.format(**report) if report.get('labels', 'hard') == 'soft' else 'hard'


def full_tables(reports):
    lines, header, labels = [], None, any_soft(reports)
    for report in reports:
        table = markdown_table(report, labels).splitlines()
        if table[0] != header:  # reports with other columns (e.g. --val-per-class) start a table of their own
            lines += ([''] if lines else []) + table[:2]
            header = table[0]
        lines += table[2:]
    return '\n'.join(lines)


def distinct_images(report):
    """How many different images a classifier of the report trained on: a fixed set's size, or every
    generated image of an on-the-fly run (fresh images in every minibatch)."""
    if report['protocol'] == 'fixed':
        return report['train_images']
    r = report['recipe']
    return r['epochs_eval'] * iterations_per_epoch(report['num_classes'], report['ipc'], r['batch_size'], False) \
        * r['batch_size']


def row_name(report):
    ipc = report['ipc']
    kmeans = ', k-means' if report.get('select') == 'kmeans' else ''  # validate.py --select kmeans
    if report['method'] == 'random':
        return f'real subset of {ipc} per class, k-means' if kmeans else f'random real subset, {ipc} per class'
    if report['method'] == 'full':
        return 'full real training set'
    if report['protocol'] == 'fixed':
        return f'DiM, fixed set of {ipc} per class' + kmeans
    return "DiM, on the fly (the paper's protocol)"


def brief_table(reports, diagnoses=()):
    """One row per report, one column per classifier (final top-1, mean ± std over seeds when more than
    one); a diagnose.json whose checkpoint is a report's generator gives that row its conditioning."""
    conditioning = {d['checkpoint']: d['G_eval_mode']['conditioning_top1'] for d in diagnoses}
    models = list(dict.fromkeys(m for report in reports for m in report['architectures']))
    show_conditioning, show_labels = bool(conditioning), any_soft(reports)
    lines = ['| trained on | distinct training images | ' + ('labels | ' if show_labels else '') + 'test BN '
             + ('| G draws the asked class (judge) ' if show_conditioning else '')
             + ''.join(f'| {m} ' for m in models) + '|',
             '|---|---|---|' + '---|' * (show_labels + show_conditioning + len(models))]
    for report in reports:
        rows = {row['architecture']: row for row in report['rows']}
        cells = [row_name(report), f"{distinct_images(report):,} {'real' if report['method'] != 'dim' else 'generated'}",
                 *([labels_cell(report)] if show_labels else []), report['test_bn']]
        if show_conditioning:
            value = conditioning.get(report.get('generator_checkpoint'))
            cells.append('–' if value is None else f'{value:.1f}%')
        for m in models:
            row = rows.get(m)
            cells.append('–' if row is None else f"{row['top1_mean']:.1f}" if report['num_eval'] == 1
                         else f"{row['top1_mean']:.1f} ± {row['top1_std']:.1f}")
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('reports', nargs='+', metavar='EVAL_JSON')
    p.add_argument('--brief', action='store_true',
                   help='one row per report, one column per classifier (final top-1)')
    p.add_argument('--diagnose', action='append', default=[], metavar='DIAGNOSE_JSON',
                   help='a misc/diagnose.py report (repeatable): its conditioning accuracy goes to the rows of '
                        'its checkpoint (with --brief)')
    args = p.parse_args(argv)
    if args.diagnose and not args.brief:
        p.error('--diagnose needs --brief')
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
    if args.brief:
        diagnoses = []
        for path in args.diagnose:
            with open(path) as f:
                diagnoses.append(json.load(f))
        print(brief_table(reports, diagnoses))
    else:
        print(full_tables(reports))


if __name__ == '__main__':
    main()
