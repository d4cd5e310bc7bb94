"""The README's results table, built from docs/results.json: ConvNet-3, the epoch chosen on held-out real
training images, one row per dataset, schedule and ipc.

    python misc/readme_table.py            # print the table
    python misc/readme_table.py --write    # put it into README.md between its two markers
    python misc/readme_table.py --check    # exit 1 when README.md's table is not what docs/results.json gives

docs/RESULTS.md (written by misc/results.py) has every table: both architectures, and DiM after stage 1
and after stages 1 + 2. tests/test_readme.py runs the check.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS_JSON = os.path.join(ROOT, 'docs', 'results.json')
README = os.path.join(ROOT, 'README.md')
BEGIN = '<!-- results table: begin (misc/readme_table.py writes this part from docs/results.json) -->'
END = '<!-- results table: end -->'
ORDER = ('cifar10', 'cifar100', 'svhn', 'fashion', 'mnist', 'cifar10-jpeg', 'digits')
ARCH, SELECTION = 'convnet', 'held-out'


def hard_label(record):
    """Records of classifiers trained on hard labels, the only kind this table shows (records from
    before soft labels have no `labels` key)."""
    return record.get('labels', 'hard') == 'hard'


def cell(records, **match):
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    if len(hits) > 1:
        raise SystemExit(f'error: {len(hits)} records of docs/results.json fit one cell of the README table: {match}')
    return f"{hits[0]['mean']:.1f} ± {hits[0]['std']:.1f}" if hits else '–'


def build(results):
    from misc.results import is_current, stands_alone
    records = [r for r in results['records']  # k-means sets (--select kmeans) and cpu-3x are RESULTS.md's
               if r['arch'] == ARCH and r['selection'] == SELECTION and hard_label(r) and r.get('select') != 'kmeans'
               and is_current(r) and stands_alone(r)]
    groups = sorted({(r['dataset'], r['schedule']['name']) for r in records},
                    key=lambda g: (g[1] != 'paper', ORDER.index(g[0]) if g[0] in ORDER else len(ORDER), g[0]))
    lines = ['| dataset, schedule, DiM stages | ipc | DiM, fixed set | DiM, on the fly | random real subset '
             '| full training set |', '|---|---|---|---|---|---|']
    seeds = set()
    for dataset, schedule in groups:
        mine = [r for r in records if r['dataset'] == dataset and r['schedule']['name'] == schedule]
        seeds |= {tuple(r['seeds']) for r in mine}
        stages = '1+2' if any(r['stages'] == '1+2' for r in mine) else '1'
        label = f"{dataset}, {schedule} schedule, {'stages 1+2' if stages == '1+2' else 'stage 1'}"
        full = cell(mine, method='full')
        for i, ipc in enumerate(sorted({r['ipc'] for r in mine if r['ipc'] is not None})):
            lines.append('| ' + ' | '.join([
                '' if i else label, str(ipc),
                cell(mine, method='dim', stages=stages, protocol='fixed', ipc=ipc),
                cell(mine, method='dim', stages=stages, protocol='onthefly', ipc=ipc),
                cell(mine, method='random', ipc=ipc), '' if i else full]) + ' |')
    if len(seeds) == 1:
        (one,) = seeds
        runs = f'{len(one)} seeds ({", ".join(map(str, one))})'
    else:
        runs = 'the seeds each row lists in docs/results.json'
    lines += ['', f'Top-1 (%) on the real test set, ConvNet-3, mean ± std over {runs}, each seed on its own draw '
              'of the set; the epoch is chosen on held-out real training images.']
    return '\n'.join(lines) + '\n'


def replace(text, table):
    if BEGIN not in text or END not in text:
        raise SystemExit(f'error: README.md lacks the markers {BEGIN} ... {END}')
    head, rest = text.split(BEGIN, 1)
    return f'{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--write', action='store_true', help='rewrite the table in README.md')
    p.add_argument('--check', action='store_true', help='exit 1 when README.md differs from docs/results.json')
    args = p.parse_args(argv)
    with open(RESULTS_JSON) as f:
        table = build(json.load(f))
    with open(README) as f:
        text = f.read()
    if args.write:
        with open(README, 'w') as f:
            f.write(replace(text, table))
    elif args.check:
        if replace(text, table) != text:
            sys.exit('README.md: the results table differs from docs/results.json; '
                     'run python misc/readme_table.py --write')
    else:
        print(table, end='')


if __name__ == '__main__':
    main()
