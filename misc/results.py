"""Gather the eval.json files that misc/reproduce.py left under results/repro-* into docs/results.json
(one record per dataset, protocol, method, stages, ipc, architecture, labels and selection) and
docs/RESULTS.md. Records of soft-label rows (validate.py --soft-labels) carry `labels: soft`, the
temperature and the teacher; records from before soft labels are hard. The teacher's own row (tag
`teacher`) is not a result and is left out.

    python misc/results.py            # the same as: python misc/reproduce.py DATASET --collect

Rows already in docs/results.json whose runs are not under results/ (a removed folder, another machine)
are kept; a rerun of a row replaces it. Only what was measured goes in; the published numbers quoted
beside them are in QUOTED, each with its source, and are never mixed into the measured records.
"""
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from misc.schedules import TEACHER_TAG, beside, schedule_for  # noqa: E402

from misc.schedules import SCHEDULES  # noqa: E402

# repro-<dataset>-<schedule>-<row>; the longer schedule names first (cpu-3x before cpu)
TAG = re.compile(r'repro-(?P<dataset>[a-z0-9-]+?)-(?P<schedule>%s)-(?P<tag>.+)$'
                 % '|'.join(sorted(map(re.escape, SCHEDULES), key=len, reverse=True)))
# how the accuracy of one classifier is read: at the last epoch, at the periodic test chosen on held-out
# real training images (--val-per-class), or the best periodic test (chosen on the test set: optimistic)
SELECTIONS = {'final': 'top1', 'held-out': 'selected_top1', 'best-on-test': 'best_top1'}

# Published ConvNet-3 accuracies (%), quoted, not measured here: dataset -> method -> {ipc: value}
QUOTED = {
    'mnist': {
        # as the project's issue quotes the two READMEs; not re-read here (they could not be opened offline)
        'source': 'DC, DSA: the README of the DatasetCondensation repository (VICO-UoE); IDC: the README of '
                  'Efficient-Dataset-Condensation (snu-mllab). Random-subset and full-data figures are left out: '
                  'no source for them could be checked',
        'DC': {1: 91.7, 10: 97.4, 50: 98.8},
        'DSA': {1: 88.7, 10: 97.8, 50: 99.2},
        'IDC': {1: 94.2, 10: 98.4, 50: 99.1},
    },
}


def records_of(report_path, schedules, times):
    m = TAG.match(os.path.basename(os.path.dirname(report_path)))
    if not m:
        return []
    with open(report_path) as f:
        report = json.load(f)
    tag = m['tag']
    if tag == TEACHER_TAG or tag.startswith(TEACHER_TAG + '-'):
        return []  # the soft rows' teacher: a classifier kept, not a row of the tables
    stages = None
    if report['method'] == 'dim':
        stages = '1+2' if tag.startswith('dim-s12-') else '1'
    key = f'eval {tag}'
    step = times.get(key, {})
    teacher = report.get('teacher') or {}
    out = []
    for row in report['rows']:
        for selection, field in SELECTIONS.items():
            if field not in row:
                continue
            store = report.get('storage') or {}
            out.append({
                'dataset': m['dataset'], 'protocol': report['protocol'], 'method': report['method'],
                'stages': stages, 'ipc': report['ipc'], 'arch': row['architecture'], 'test_bn': report['test_bn'],
                'labels': report.get('labels', 'hard'), 'temperature': report.get('temperature'),
                'teacher': {k: teacher.get(k) for k in ('architecture', 'sha256', 'test_top1')} if teacher else None,
                'select': select_of(report),
                'selection': selection, 'mean': round(row[f'{field}_mean'], 2), 'std': round(row[f'{field}_std'], 2),
                'seeds': row['seeds'], 'set_seeds': report.get('set_seeds'),
                'accuracies': [round(v, 2) for v in row[field]],
                'schedule': {'name': m['schedule'], **schedules.get(m['schedule'], {})},
                'storage_bytes': {'generator_fp32': store.get('generator_bytes_fp32'),
                                  'generator_bf16': store.get('generator_bytes_bf16'),
                                  'ipc_images_uint8': store.get('ipc_images_bytes_uint8')},
                'wall_s': round(row['wall_seconds'], 1), 'device': report['device'],
                'hardware': report.get('hardware'), 'torch': report['torch'],
                'commit': step.get('commit'),
            })
    return out


def select_of(report_or_record):
    """Which images a fixed set kept (validate.py --select): 'random' or 'kmeans' for a fixed set or a real
    subset, None where nothing is chosen (on the fly, the full set). Reports and records from before
    --select are random draws."""
    if report_or_record['protocol'] != 'fixed' or report_or_record['method'] == 'full':
        return None
    return report_or_record.get('select') or 'random'


RECORD_KEY = ('dataset', 'protocol', 'method', 'stages', 'ipc', 'arch', 'labels', 'select', 'selection')
BEFORE_SOFT_LABELS = {'labels': 'hard', 'temperature': None, 'teacher': None}  # what older records lack


# Records of code from before the augmentation followed the official code's shift direction and rotation
# sign (commit 19d83b6): their rows no longer come back from today's commands. results.json keeps them (with
# their commits); the tables, the README's table and the figure show none of them, and RESULTS.md lists
# which rows wait for a rerun.
OUTDATED_COMMITS = ('6454d85', '056ed18', '1104ac6', '5ec6fbe')


def is_current(record):
    return record.get('commit') not in OUTDATED_COMMITS


def stands_alone(record):
    """Whether a record's schedule has tables of its own, not a variant read beside another (cpu-3x)."""
    return beside(record['dataset'], record['schedule']['name']) is None


def with_defaults(record):
    """A record with the fields that records from before soft labels and --select lack."""
    return {**BEFORE_SOFT_LABELS, **record, 'select': select_of(record)}


def _key(record):
    return (record['schedule']['name'],) + tuple(with_defaults(record)[k] for k in RECORD_KEY)


def collect(results_dir, json_path, md_path):
    """Write the records of the runs under results_dir into json_path and md_path. Records already in
    json_path whose runs are not under results_dir (another machine's, or a results/ folder since
    removed) are kept: a row is replaced only by a new run of the same row, never dropped."""

    found, stage_times = {}, {}
    for path in sorted(glob.glob(os.path.join(results_dir, 'repro-*', 'eval.json'))):
        m = TAG.match(os.path.basename(os.path.dirname(path)))
        if not m:
            continue
        times_path = os.path.join(results_dir, f"repro-{m['dataset']}-{m['schedule']}-times.json")
        times = json.load(open(times_path)) if os.path.exists(times_path) else {}
        stage_times[f"{m['dataset']}/{m['schedule']}"] = {k: round(v['seconds'], 1) for k, v in times.items()
                                                           if k.startswith('stage')}
        try:
            schedule = schedule_for(m['dataset'], m['schedule'])
        except SystemExit:
            schedule = {}
        for record in records_of(path, {m['schedule']: schedule}, times):
            found[_key(record)] = record
    earlier = json.load(open(json_path)) if os.path.exists(json_path) else {}
    # records from before eval.json named the hardware say so with None; those from before soft labels are hard
    kept = [{'hardware': None, **with_defaults(r)} for r in earlier.get('records', []) if _key(r) not in found]
    records = kept + list(found.values())
    stage_times = {name: {**earlier.get('stage_wall_s', {}).get(name, {}), **stage_times.get(name, {})}
                   for name in sorted({*earlier.get('stage_wall_s', {}), *stage_times})}
    with open(json_path, 'w') as f:
        json.dump({'records': records, 'stage_wall_s': stage_times, 'quoted': QUOTED}, f, indent=1)
        f.write('\n')
    write_between_markers(md_path, markdown(records, stage_times))
    print(f"wrote {len(records)} records ({len(found)} from {os.path.relpath(results_dir, ROOT)}, {len(kept)} kept "
          f"from the earlier {os.path.relpath(json_path, ROOT)}) and {os.path.relpath(md_path, ROOT)}")


BEGIN, END = '<!-- measured results: begin (misc/results.py writes this part) -->', '<!-- measured results: end -->'


def write_between_markers(path, generated):
    """Replace the generated part of docs/RESULTS.md, keeping the prose around it."""
    text = open(path).read() if os.path.exists(path) else f'# Results\n\n{BEGIN}\n{END}\n'
    if BEGIN not in text or END not in text:
        text += f'\n{BEGIN}\n{END}\n'
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, 'w') as f:
        f.write(f'{head}{BEGIN}\n{generated}{END}{tail}')


def _cell(records, **match):
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    if not hits:
        return '–'
    r = hits[0]
    return f"{r['mean']:.1f} ± {r['std']:.1f}"


# the tables' columns between ipc and the full training set: heading, and what a record of it matches
COLUMNS = [('random real subset', dict(method='random')),
           ('DiM stage 1, on the fly', dict(method='dim', stages='1', protocol='onthefly')),
           ('DiM stage 1, fixed set', dict(method='dim', stages='1', protocol='fixed')),
           ('DiM stages 1+2, on the fly', dict(method='dim', stages='1+2', protocol='onthefly')),
           ('DiM stages 1+2, fixed set', dict(method='dim', stages='1+2', protocol='fixed'))]


def markdown(records, stage_times):
    """The measured tables, one per dataset, schedule and architecture (held-out selection), with the
    quoted published numbers in separate columns; where soft-label rows exist, a second table under it
    puts each column's hard and soft rows side by side."""
    lines = []
    outdated = sorted({(r['dataset'], r['schedule']['name'], r['arch']) for r in records if not is_current(r)})
    records = [r for r in records if is_current(r)]
    keys = sorted({(r['dataset'], r['schedule']['name'], r['arch']) for r in records if stands_alone(r)})
    timed = set()
    for dataset, schedule, arch in keys:
        mine = [with_defaults(r) for r in records if r['dataset'] == dataset and r['schedule']['name'] == schedule
                and r['arch'] == arch and r['selection'] == 'held-out' and select_of(r) != 'kmeans']
        quoted = QUOTED.get(dataset, {}) if arch == 'convnet' else {}
        qcols = [k for k in ('random', 'DC', 'DSA', 'IDC') if k in quoted]
        lines += [f'## {dataset}, {schedule} schedule, {arch}', '']
        # the columns this dataset has rows of (no stage-2 columns where stage 2 did not run)
        columns = [(title, match) for title, match in COLUMNS
                   if any(all(r.get(k) == v for k, v in match.items()) for r in mine)]
        header = ['ipc'] + [title for title, _ in columns] + ['full training set']
        header += [f'{k} (quoted)' for k in qcols]
        lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        full = _cell(mine, method='full', labels='hard')
        ipcs = sorted({r['ipc'] for r in mine if r['ipc'] is not None})
        hard_ipcs = sorted({r['ipc'] for r in mine if r['ipc'] is not None and r['labels'] == 'hard'})
        for ipc in hard_ipcs:
            cells = [str(ipc)] + [_cell(mine, **match, ipc=ipc, labels='hard') for _, match in columns]
            cells += [full if ipc == hard_ipcs[0] else '']  # the full set has no ipc: once, as in the README
            cells += [str(quoted[k].get(ipc, '–')) for k in qcols]
            lines.append('| ' + ' | '.join(cells) + ' |')
        if quoted:
            lines += ['', f"Quoted columns (published, not measured here): {quoted['source']}."
                      + (f" Full training set (quoted): {quoted['full'][None]}." if 'full' in quoted else '')]
        soft = [r for r in mine if r['labels'] == 'soft']
        if soft:
            lines += soft_table(mine, soft, ipcs, full)
        # the stages' wall times once, under the first table of the run (its other architectures share them)
        times = stage_times.get(f'{dataset}/{schedule}', {}) if (dataset, schedule) not in timed else {}
        timed.add((dataset, schedule))
        if times:  # the device and torch; the hardware stays in results.json
            first = mine[0] if mine else {}
            where = f"{first.get('device', '?')}, torch {first.get('torch', '?')}"
            lines += ['', 'Wall time: ' + ', '.join(f"{k} {seconds / 60:.1f} min" for k, seconds in sorted(times.items()))
                      + f" ({where})."]
        lines.append('')
    if outdated:
        lines += ['## Waiting for a rerun', '',
                  'Rows from before the augmentation followed the official code (in results.json only): '
                  + '; '.join(f'{d} {a} ({s})' for d, s, a in outdated) + '.', '']
    return '\n'.join(lines + kmeans_table(records) + variant_tables(records, stage_times)) + '\n'


# the rows of the k-means table: heading, and what a record of it matches (DiM: the dataset's last stage)
SET_KINDS = [('DiM fixed set, random draw', dict(method='dim', protocol='fixed', select='random')),
             ('DiM fixed set, k-means', dict(method='dim', protocol='fixed', select='kmeans')),
             ('random real subset', dict(method='random', select='random')),
             ('k-means real subset', dict(method='random', select='kmeans'))]


def kmeans_table(records):
    """Lines of the table of stored sets chosen at random against by k-means (validate.py --select): one
    column per set kind, one row per dataset, schedule, ipc and labels that has a k-means row (ConvNet-3,
    held-out selection); empty when no k-means row exists."""
    mine = [with_defaults(r) for r in records
            if r['arch'] == 'convnet' and r['selection'] == 'held-out' and stands_alone(r)]
    rows = sorted({(r['dataset'], r['schedule']['name'], r['ipc'], r['labels']) for r in mine
                   if r['select'] == 'kmeans'})
    if not rows:
        return []
    last_stage = {(r['dataset'], r['schedule']['name']): r['stages'] for r in mine if r['stages'] == '1+2'}
    lines = ['## Stored sets: random draw against k-means', '',
             "ConvNet-3, held-out selection, `--select kmeans` in the full-set teacher's features.", '',
             '| dataset (schedule) | ipc | labels | ' + ' | '.join(title for title, _ in SET_KINDS) + ' |',
             '|---|---|---|' + '---|' * len(SET_KINDS)]
    for dataset, schedule, ipc, labels in rows:
        cells = []
        for title, match in SET_KINDS:
            stages = last_stage.get((dataset, schedule), '1') if match['method'] == 'dim' else None
            cells.append(_cell([r for r in mine if r['dataset'] == dataset and r['schedule']['name'] == schedule
                                and r['stages'] == stages], **match, ipc=ipc, labels=labels))
        lines.append(f'| {dataset} ({schedule}) | {ipc} | {labels} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


# the rows of a variant schedule's table: heading, what a record of it matches, and whether it is read from
# the base schedule in both columns (a real subset has no generator in it)
VARIANT_ROWS = [('DiM, on the fly', dict(method='dim', protocol='onthefly'), False),
                ('DiM fixed set, random draw', dict(method='dim', protocol='fixed', select='random'), False),
                ('DiM fixed set, k-means', dict(method='dim', protocol='fixed', select='kmeans'), False),
                ('random real subset', dict(method='random', select='random'), True),
                ('k-means real subset', dict(method='random', select='kmeans'), True)]


def variant_tables(records, stage_times):
    """Lines of a table per variant schedule (cpu-3x) and dataset: its DiM rows beside those of the
    schedule it varies, at each ipc of the variant (ConvNet-3, hard labels, held-out selection, DiM's last
    stage), and the stage wall times."""
    mine = [with_defaults(r) for r in records
            if r['arch'] == 'convnet' and r['selection'] == 'held-out' and r['labels'] == 'hard']
    lines = []
    for dataset, variant in sorted({(r['dataset'], r['schedule']['name']) for r in mine if not stands_alone(r)}):
        base = beside(dataset, variant)
        ipcs = sorted({r['ipc'] for r in mine if r['dataset'] == dataset and r['schedule']['name'] == variant
                       and r['ipc'] is not None})
        columns = [(schedule, ipc) for ipc in ipcs for schedule in (base, variant)]
        epochs = {s: schedule_for(dataset, s)['stage1']['epochs'] for s in (base, variant)}
        lines += [f'## More compute: {dataset}, schedule {variant} beside {base}', '',
                  f"Stage 1 for {epochs[variant]} epochs ({variant}), {epochs[base]} ({base}); real images: {base}'s "
                  f"rows in both; ConvNet-3, hard labels.", '',
                  '| set | ' + ' | '.join(f'{s}, ipc {i}' for s, i in columns) + ' |', '|---|' + '---|' * len(columns)]
        for title, match, from_base in VARIANT_ROWS:
            cells = []
            for schedule, ipc in columns:
                source = base if from_base else schedule
                stages = ('1+2' if schedule_for(dataset, source).get('stage2') else '1') if match['method'] == 'dim' else None
                cells.append(_cell([r for r in mine if r['dataset'] == dataset and r['schedule']['name'] == source
                                    and r['stages'] == stages], **match, ipc=ipc))
            lines.append(f'| {title} | ' + ' | '.join(cells) + ' |')
        times = {s: stage_times.get(f'{dataset}/{s}', {}).get('stage1') for s in (base, variant)}
        if all(times.values()):
            lines += ['', 'Stage 1 wall time: ' + ', '.join(f'{s} {t / 60:.1f} min' for s, t in times.items()) + '.']
        lines.append('')
    return lines


def soft_table(mine, soft, ipcs, full):
    """Lines of the hard-against-soft table: each column that has soft rows as a hard and a soft column,
    the full training set (hard) at the end, and the teachers (file, own test accuracy, temperature)."""
    cols = [(title, match) for title, match in COLUMNS
            if any(all(r.get(k) == v for k, v in match.items()) for r in soft)]
    header = ['ipc'] + [f'{title}, {labels}' for title, _ in cols for labels in ('hard', 'soft')]
    header += ['full training set (hard)']
    lines = ['', "Hard against soft labels (`validate.py --soft-labels`):", '',
             '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for ipc in ipcs:
        cells = [str(ipc)] + [_cell(mine, **match, ipc=ipc, labels=labels) for _, match in cols
                              for labels in ('hard', 'soft')] + [full if ipc == ipcs[0] else '']
        lines.append('| ' + ' | '.join(cells) + ' |')
    teachers = {(r['teacher'] or {}).get('sha256'): r for r in soft}
    described = []
    for sha, r in sorted(teachers.items(), key=lambda item: str(item[0])):
        t = r['teacher'] or {}
        accuracy = f"{t['test_top1']:.1f}%" if t.get('test_top1') is not None else 'not recorded'
        described.append(f"{t.get('architecture', '?')} (sha256 {str(sha)[:12]}), test top-1 {accuracy}")
    temperatures = '/'.join(sorted({f"{r['temperature']:g}" for r in soft}))
    return lines + ['', f"Teacher{'s' if len(described) > 1 else ''}: {'; '.join(described)}; "
                    f"temperature {temperatures}."]


if __name__ == '__main__':
    collect(os.path.join(ROOT, 'results'), os.path.join(ROOT, 'docs', 'results.json'),
            os.path.join(ROOT, 'docs', 'RESULTS.md'))
