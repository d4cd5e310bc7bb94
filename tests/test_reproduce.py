"""misc/reproduce.py (every results row, resumable), misc/results.py (the records and RESULTS.md) and
misc/compare.py (several reports in one table), on real reports of tiny evaluations."""
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from data.datasets import load_dataset
from misc import reproduce
from misc.results import BEGIN, END, TAG, collect, markdown
from tests.helpers import ROOT, eval_args, save_tiny_generator
from validate import run_evaluation

CPU = torch.device('cpu')
NOCTX = torch.autocast('cpu', enabled=False)


def _args(**kw):
    return eval_args(num_eval=2, val_per_class=2, **kw)


@pytest.fixture(scope='module')
def reports(tmp_path_factory):
    """Two real reports laid out as misc/reproduce.py leaves them."""
    info, train, test = load_dataset('digits')
    test = type(test)(test.images[:40], test.labels[:40])
    root = tmp_path_factory.mktemp('results')
    G = save_tiny_generator(str(root / 'g.pth'), info, seed=0)
    made = {'random-ipc1': run_evaluation(_args(baseline='random'), info, train, test, CPU, NOCTX),
            'dim-s12-fixed-ipc1': run_evaluation(_args(), info, train, test, CPU, NOCTX, G=G,
                                                 checkpoint=str(root / 'g.pth'))}
    for tag, report in made.items():
        folder = root / f'repro-digits-cpu-{tag}'
        folder.mkdir()
        (folder / 'eval.json').write_text(json.dumps(report))
    (root / 'repro-digits-cpu-times.json').write_text(json.dumps(
        {'stage1': {'seconds': 60.0, 'commit': 'abc1234'}, 'eval random-ipc1': {'seconds': 5.0, 'commit': 'abc1234'}}))
    return root, made


def test_collect_writes_one_record_per_selection_and_keeps_the_prose(reports, tmp_path):
    root, made = reports
    md = tmp_path / 'RESULTS.md'
    md.write_text(f'# Results\n\nprose before\n\n{BEGIN}\nold table\n{END}\n\nprose after\n')
    collect(str(root), str(tmp_path / 'results.json'), str(md))
    records = json.loads((tmp_path / 'results.json').read_text())['records']
    assert len(records) == 2 * 3  # two reports x (final, held-out, best-on-test)
    rand = [r for r in records if r['method'] == 'random']
    assert {r['selection'] for r in rand} == {'final', 'held-out', 'best-on-test'}
    held = next(r for r in rand if r['selection'] == 'held-out')
    row = made['random-ipc1']['rows'][0]
    assert held['accuracies'] == [round(v, 2) for v in row['selected_top1']] and held['seeds'] == [7, 8]
    assert held['set_seeds'] == [7, 8] and held['commit'] == 'abc1234' and held['stages'] is None
    assert held['schedule']['name'] == 'cpu' and held['schedule']['width'] == 64
    for key in ('dataset', 'protocol', 'method', 'stages', 'ipc', 'arch', 'test_bn', 'selection', 'mean', 'std',
                'seeds', 'accuracies', 'schedule', 'storage_bytes', 'wall_s', 'device', 'hardware', 'torch', 'commit'):
        assert key in held, key
    assert held['hardware'] == made['random-ipc1']['hardware'] and 'kernels' in held['hardware']
    dim = next(r for r in records if r['method'] == 'dim' and r['selection'] == 'final')
    assert dim['stages'] == '1+2' and dim['storage_bytes']['generator_fp32'] > 0
    assert held['select'] == dim['select'] == 'random'  # a real subset and a fixed set, both drawn at random
    text = md.read_text()
    assert 'prose before' in text and 'prose after' in text and 'old table' not in text
    assert '## digits, cpu schedule, convnet' in text
    mean, std = row['selected_top1_mean'], row['selected_top1_std']
    assert f'| 1 | {mean:.1f} ± {std:.1f} |' in text  # the random column of the ipc-1 row
    # the wall-time line names the device and torch; the CPU model stays in results.json
    assert f"Wall time: stage1 1.0 min (cpu, torch {torch.__version__})." in text and held['hardware'] not in text


def test_collect_keeps_earlier_rows_and_replaces_only_rerun_ones(reports, tmp_path):
    """docs/results.json is the lasting record: collecting from a results/ folder that lacks some runs
    (removed, or made on another machine) keeps their rows; a rerun of a row replaces it."""
    root, made = reports
    out, md = tmp_path / 'results.json', tmp_path / 'RESULTS.md'
    collect(str(root), str(out), str(md))
    first = json.loads(out.read_text())
    collect(str(tmp_path / 'no-results'), str(out), str(md))  # the runs are gone: nothing is lost
    assert json.loads(out.read_text()) == first
    partial = tmp_path / 'partial'
    (partial / 'repro-digits-cpu-random-ipc1').mkdir(parents=True)
    rerun = json.loads(json.dumps(made['random-ipc1']))
    rerun['rows'][0]['selected_top1_mean'] = 12.5
    (partial / 'repro-digits-cpu-random-ipc1' / 'eval.json').write_text(json.dumps(rerun))
    collect(str(partial), str(out), str(md))
    records = json.loads(out.read_text())['records']
    assert len(records) == len(first['records'])
    held = [r for r in records if r['method'] == 'random' and r['selection'] == 'held-out']
    assert [r['mean'] for r in held] == [12.5]
    assert [r for r in records if r['method'] == 'dim'] == [r for r in first['records'] if r['method'] == 'dim']
    assert json.loads(out.read_text())['stage_wall_s'] == {'digits/cpu': {'stage1': 60.0}}


def test_collect_keeps_kmeans_rows_apart_in_a_table_of_their_own(reports, tmp_path):
    root, made = reports
    out, md = tmp_path / 'results.json', tmp_path / 'RESULTS.md'
    collect(str(root), str(out), str(md))
    table_before = md.read_text()
    both = tmp_path / 'both'
    kmeans = json.loads(json.dumps(made['random-ipc1']))
    kmeans.update(select='kmeans', select_features={'sha256': 'f' * 64})
    kmeans['rows'][0]['selected_top1_mean'] = 42.0
    (both / 'repro-digits-cpu-random-ipc1-kmeans').mkdir(parents=True)
    (both / 'repro-digits-cpu-random-ipc1-kmeans' / 'eval.json').write_text(json.dumps(kmeans))
    collect(str(both), str(out), str(md))
    records = json.loads(out.read_text())['records']
    assert sorted(r['select'] for r in records if r['method'] == 'random' and r['selection'] == 'held-out') == \
        ['kmeans', 'random']  # a record of its own beside the random draw's, which stays
    text = md.read_text()
    # the dataset's table is unchanged; the k-means one holds both kinds of real subset
    assert text.split('## Stored sets')[0].rstrip() == table_before.split('<!-- measured results: end')[0].rstrip()
    kmeans_part = text.split('## Stored sets: random draw against k-means')[1]
    random_mean = made['random-ipc1']['rows'][0]['selected_top1_mean']
    dim_mean = made['dim-s12-fixed-ipc1']['rows'][0]['selected_top1_mean']  # DiM: the dataset's last stage
    # columns: DiM random draw, DiM k-means, random real, k-means real
    row = [line for line in kmeans_part.splitlines() if line.startswith('| digits (cpu) | 1 | hard |')]
    means = [cell.split(' ±')[0] for cell in row[0].split(' | ')[3:]] if len(row) == 1 else None
    assert means == [f'{dim_mean:.1f}', '–', f'{random_mean:.1f}', '42.0']


def _collect_edited(root, tmp_path, edit):
    """Collect the reports, apply edit(record) to each record of results.json, and collect again without
    the runs (the records are only kept); returns (records before, records after, RESULTS.md text)."""
    out, md = tmp_path / 'results.json', tmp_path / 'RESULTS.md'
    collect(str(root), str(out), str(md))
    data = json.loads(out.read_text())
    for record in data['records']:
        edit(record)
    out.write_text(json.dumps(data))
    collect(str(tmp_path / 'no-results'), str(out), str(md))
    return data['records'], json.loads(out.read_text())['records'], md.read_text()


def test_rows_of_outdated_code_stay_in_results_json_but_in_no_table(reports, tmp_path):
    from misc.results import OUTDATED_COMMITS

    def outdate(record):
        if record['method'] == 'random':
            record['commit'] = OUTDATED_COMMITS[0]
    before, after, text = _collect_edited(reports[0], tmp_path, outdate)
    assert len(after) == len(before)  # kept, with their commit
    assert '| random real subset |' not in text.split('## Waiting for a rerun')[0]
    assert 'digits convnet (cpu)' in text.split('## Waiting for a rerun')[1]


def test_a_variant_schedule_is_one_table_beside_its_base_and_in_no_other(reports, tmp_path):
    """cpu-3x's DiM rows sit beside the cpu schedule's (the real subsets read from cpu in both columns),
    in no table of their own, not in the README table, the k-means table or the figure."""
    from misc import readme_table, results_figure
    out = tmp_path / 'results.json'
    collect(str(reports[0]), str(out), str(tmp_path / 'RESULTS.md'))
    base = [{**r, 'dataset': 'mnist', 'stages': '1' if r['method'] == 'dim' else None}
            for r in json.loads(out.read_text())['records']]
    variant = [{**r, 'schedule': {**r['schedule'], 'name': 'cpu-3x'}, 'mean': 77.7, 'std': 0.1}
               for r in base if r['method'] == 'dim']
    kmeans = [{**r, 'schedule': {**r['schedule'], 'name': 'cpu-3x'}, 'select': 'kmeans', 'mean': 88.8}
              for r in base if r['method'] == 'dim']
    records = base + variant + kmeans
    text = markdown(records, {'mnist/cpu': {'stage1': 60.0}, 'mnist/cpu-3x': {'stage1': 180.0}})
    assert '## mnist, cpu schedule, convnet' in text and 'cpu-3x schedule' not in text
    table = text.split('## More compute: mnist, schedule cpu-3x beside cpu')[1]
    assert 'Stage 1 for 6 epochs (cpu-3x), 2 (cpu)' in table and 'cpu 1.0 min, cpu-3x 3.0 min' in table
    cells = [[c.strip('| ').split(' ±')[0] for c in line.split(' | ')] for line in table.splitlines()
             if line.startswith('| ') and not line.startswith('| set')]
    rows = {first: rest for first, *rest in cells}
    held = {r['method']: f"{r['mean']:.1f}" for r in base if r['selection'] == 'held-out' and r['ipc'] == 1}
    assert rows['DiM fixed set, random draw'] == [held['dim'], '77.7']
    assert rows['DiM fixed set, k-means'] == ['–', '88.8']
    assert rows['random real subset'] == [held['random']] * 2
    assert 'mnist (cpu-3x)' not in text.split('## More compute')[0]
    assert 'cpu-3x' not in readme_table.build({'records': records})
    assert set(results_figure.panels(records)) == {('mnist', 'cpu')}


def test_kept_rows_from_before_the_hardware_was_recorded_say_none(reports, tmp_path):
    _, after, _ = _collect_edited(reports[0], tmp_path, lambda record: record.pop('hardware'))
    assert {r['hardware'] for r in after} == {None}


def test_compare_prints_reports_under_one_header(reports):
    root, _ = reports
    paths = [str(root / f'repro-digits-cpu-{t}' / 'eval.json') for t in ('random-ipc1', 'dim-s12-fixed-ipc1')]
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'compare.py'), *paths], capture_output=True,
                         text=True, check=True).stdout
    assert out.count('| method |') == 1 and '| random | fixed |' in out and '| dim | fixed |' in out


def test_compare_brief_puts_the_conditioning_beside_the_rows_of_its_generator(reports, tmp_path):
    """The quick start's table: one row per report, one column per classifier, the distinct images each
    training saw, and a misc/diagnose.py report's conditioning on the rows of its checkpoint only."""
    root, made = reports
    dim = made['dim-s12-fixed-ipc1']
    diagnose = tmp_path / 'diagnose.json'
    diagnose.write_text(json.dumps({'checkpoint': dim['generator_checkpoint'],
                                    'G_eval_mode': {'conditioning_top1': 93.25}}))
    paths = [str(root / f'repro-digits-cpu-{t}' / 'eval.json') for t in ('dim-s12-fixed-ipc1', 'random-ipc1')]
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'compare.py'), '--brief', *paths,
                          '--diagnose', str(diagnose)], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 4 and '| G draws the asked class (judge) | convnet |' in lines[0]
    dim_mean, dim_std = dim['rows'][0]['top1_mean'], dim['rows'][0]['top1_std']
    assert lines[2] == (f'| DiM, fixed set of 1 per class | 10 generated | running | 93.2% '
                        f'| {dim_mean:.1f} ± {dim_std:.1f} |')
    assert lines[3].startswith('| random real subset, 1 per class | 10 real | running | – | ')
    onthefly = {**dim, 'protocol': 'onthefly', 'train_images': None, 'ipc': 50, 'test_bn': 'batch',
                'recipe': {**dim['recipe'], 'epochs_eval': 30, 'batch_size': 64}}
    from misc.compare import brief_table
    row = brief_table([onthefly]).splitlines()[2]
    assert row.startswith("| DiM, on the fly (the paper's protocol) | 13,440 generated | batch |")  # 30 x 7 x 64


def _record_runs(tmp_path, monkeypatch, stage1_final):
    """Replace the scripts by a recorder that leaves each step's finished file under tmp_path/results;
    returns the list of (script, flags) it fills."""
    calls = []
    finished = {'validate.py': 'eval.json', 'gen_condense.py': stage1_final, 'pool_match.py': 'last.pth'}

    def fake_run(script, *flags, log):
        flags = [str(f) for f in flags]
        calls.append((script, flags))
        folder = tmp_path / 'results' / flags[flags.index('--tag') + 1]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / finished[script]).write_text('{}')
        return 1.0
    monkeypatch.setattr(reproduce, 'run', fake_run)
    monkeypatch.setattr(reproduce, 'ROOT', str(tmp_path))
    (tmp_path / 'figs').mkdir()
    return calls


def test_reproduce_runs_each_step_once_and_resumes(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_49.pth')
    args = Namespace(dataset='digits', schedule='cpu', data_dir=None, device='cpu', rows=None, eval_model=None)
    # a stage-2 run that was stopped: its last.pth is there, so it continues with --resume
    (tmp_path / 'results' / 'repro-digits-cpu-s2').mkdir(parents=True)
    (tmp_path / 'results' / 'repro-digits-cpu-s2' / 'last.pth').write_text('')
    reproduce.Reproduction(args).all()
    scripts = [c[0] for c in calls]
    assert scripts[:2] == ['gen_condense.py', 'pool_match.py'] and '--resume' in calls[1][1]
    assert '--resume' not in calls[0][1]
    # 3 ipcs x 2 generators x 2 protocols + 3 random + full
    assert scripts.count('validate.py') == 12 + 3 + 1
    tags = [c[1][c[1].index('--tag') + 1] for c in calls]
    assert tags.index('repro-digits-cpu-full') < tags.index('repro-digits-cpu-random-ipc50')  # cheap rows first
    for script, flags in calls:
        if script == 'validate.py':
            assert flags[flags.index('--val-per-class') + 1] == '10' and flags[flags.index('--num-eval') + 1] == '3'
    times = json.loads((tmp_path / 'results' / 'repro-digits-cpu-times.json').read_text())
    assert times['stage1']['seconds'] == 1.0
    calls.clear()
    reproduce.Reproduction(args).all()  # everything is done: nothing runs again
    assert calls == []


def test_reproduce_refuses_a_dataset_without_cpu_schedule():
    with pytest.raises(SystemExit, match='no cpu schedule for svhn'):
        reproduce.schedule_for('svhn', 'cpu')
    assert reproduce.schedule_for('svhn', 'paper')['width'] == 196


def test_diagnose_reports_conditioning_and_spread(tmp_path):
    info = load_dataset('digits')[0]
    save_tiny_generator(str(tmp_path / 'g.pth'), info, seed=0)
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'diagnose.py'), '--pretrain-weight',
                          str(tmp_path / 'g.pth'), '--epochs', '1', '--per-class', '4'], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / 'diagnose.json').read_text())
    assert 50 < report['judge_real_test_top1'] <= 100  # one real-data epoch already learns digits
    for mode in ('G_eval_mode', 'G_train_mode'):
        r = report[mode]
        assert 0 <= r['conditioning_top1'] <= 100 and len(r['conditioning_top1_per_class']) == 10
        assert r['within_class_distance'] > 0 and len(r['pixel_mean']) == 1
    assert report['real_pixel_mean'][0] == pytest.approx(0.305, abs=0.01)  # digits' table value
    bad = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'diagnose.py'), '--pretrain-weight',
                          str(tmp_path / 'g.pth'), '--per-class', '1'], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_reproduce_rows_runs_only_the_rows_asked_for(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_1.pth')
    args = Namespace(dataset='mnist', schedule='cpu', data_dir='data', device='cpu', rows=['50'], eval_model=None)
    reproduce.Reproduction(args).all()
    tags = [c[1][c[1].index('--tag') + 1] for c in calls]
    # the stage the rows need, then only the ipc-50 rows (mnist's cpu schedule has no stage 2)
    assert tags == ['repro-mnist-cpu-s1', 'repro-mnist-cpu-dim-s1-onthefly-ipc50',
                    'repro-mnist-cpu-dim-s1-fixed-ipc50', 'repro-mnist-cpu-random-ipc50']
    # another classifier: rows of their own beside the finished ConvNet-3 ones, the stage not rerun
    calls.clear()
    reproduce.Reproduction(Namespace(**{**vars(args), 'eval_model': ['resnet18']})).all()
    assert [c[1][c[1].index('--tag') + 1] for c in calls] == [
        'repro-mnist-cpu-dim-s1-onthefly-ipc50-resnet18', 'repro-mnist-cpu-dim-s1-fixed-ipc50-resnet18',
        'repro-mnist-cpu-random-ipc50-resnet18']
    assert all(c[1][c[1].index('--eval-model') + 1] == 'resnet18' and c[1][c[1].index('--eval-model') + 2] != 'convnet'
               for c in calls)
    times = json.loads((tmp_path / 'results' / 'repro-mnist-cpu-times.json').read_text())
    assert 'eval random-ipc50-resnet18' in times and 'eval random-ipc50' in times


def test_reproduce_only_runs_the_rows_of_those_tags(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_49.pth')
    args = Namespace(dataset='digits', schedule='cpu', data_dir=None, device='cpu', rows=['50'], eval_model=None,
                     labels=['hard', 'soft'], only=['random-ipc50-soft', 'dim-s12-fixed-ipc50'])
    reproduce.Reproduction(args).all()
    # a DiM row asked for: the stages run, and the teacher (the full row); of the rows only the two tags
    assert _tags(calls) == ['repro-digits-cpu-s1', 'repro-digits-cpu-s2', 'repro-digits-cpu-full',
                            'repro-digits-cpu-dim-s12-fixed-ipc50', 'repro-digits-cpu-random-ipc50-soft']
    monkeypatch.setattr(sys, 'argv', ['reproduce.py', 'digits', '--rows', '50', '--only', 'random-ipc50-soft'])
    with pytest.raises(SystemExit, match=r"--only random-ipc50-soft: not a row of this schedule, --rows and "
                                         r"--labels; its rows are dim-s1-onthefly-ipc50, .*, random-ipc50$"):
        reproduce.main()  # hard labels only: no soft row to pick


def test_reproduce_only_rows_of_real_images_train_no_generator(tmp_path, monkeypatch):
    """A second process beside one training stage 1 (--only its real-image rows) must not train it too."""
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_49.pth')
    args = Namespace(dataset='digits', schedule='cpu', data_dir=None, device='cpu', rows=['1', 'full'],
                     eval_model=None, labels=['hard', 'soft'], only=['random-ipc1', 'random-ipc1-soft'])
    reproduce.Reproduction(args).all()
    assert _tags(calls) == ['repro-digits-cpu-full', 'repro-digits-cpu-random-ipc1',
                            'repro-digits-cpu-random-ipc1-soft']  # the teacher (full row), then the two rows


def test_reproductions_side_by_side_keep_each_others_times(tmp_path, monkeypatch):
    _record_runs(tmp_path, monkeypatch, 'model_dict_1.pth')
    base = dict(dataset='mnist', schedule='cpu', data_dir='data', device='cpu', rows=['50'], eval_model=None)
    first = reproduce.Reproduction(Namespace(**base, only=['random-ipc50']))
    second = reproduce.Reproduction(Namespace(**base, only=['dim-s1-fixed-ipc50']))  # started before first ran
    first.all()
    second.all()
    times = json.loads((tmp_path / 'results' / 'repro-mnist-cpu-times.json').read_text())
    assert set(times) == {'stage1', 'eval random-ipc50', 'eval dim-s1-fixed-ipc50'}


def test_reproduce_continues_an_earlier_run_only_with_resume(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_1.pth')
    collected = []
    monkeypatch.setattr('misc.results.collect', lambda *paths: collected.append(paths))
    first_run = ['reproduce.py', 'mnist', '--data-dir', 'data', '--device', 'cpu', '--rows', '1']
    monkeypatch.setattr(sys, 'argv', first_run)
    reproduce.main()  # nothing under results/ yet: a first run needs no --resume
    done = len(calls)
    assert done == 4 and len(collected) == 1
    more_rows = ['reproduce.py', 'mnist', '--data-dir', 'data', '--device', 'cpu', '--rows', '10']
    monkeypatch.setattr(sys, 'argv', more_rows)
    with pytest.raises(SystemExit, match=r'results/repro-mnist-cpu-\* hold an earlier run .* add --resume'):
        reproduce.main()
    assert len(calls) == done and len(collected) == 1  # refused before anything ran or was rewritten
    monkeypatch.setattr(sys, 'argv', more_rows + ['--resume'])
    reproduce.main()
    assert [f[f.index('--tag') + 1] for _, f in calls[done:]] == [
        'repro-mnist-cpu-dim-s1-onthefly-ipc10', 'repro-mnist-cpu-dim-s1-fixed-ipc10', 'repro-mnist-cpu-random-ipc10']


def test_reproduce_refuses_an_unknown_row_or_model(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['reproduce.py', 'mnist', '--rows', '50', '20'])
    with pytest.raises(SystemExit, match=r"--rows 20: this schedule's rows are 1, 10, 50, full"):
        reproduce.main()
    monkeypatch.setattr(sys, 'argv', ['reproduce.py', 'mnist', '--eval-model', 'resnet19'])
    with pytest.raises(SystemExit, match=r"--eval-model resnet19: not a model; choose from .*resnet18"):
        reproduce.main()


def test_reproduce_reads_the_cifar10_jpeg_copy_as_an_image_folder(tmp_path, monkeypatch):
    """The JPEG copy of CIFAR-10 runs under --data imagefolder, and its rows keep a dataset name of their
    own (with a dash, which the tag parser must take whole)."""
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_2.pth')
    args = Namespace(dataset='cifar10-jpeg', schedule='cpu', data_dir='/x/cifar10-jpeg', device='cpu', rows=['1'],
                     eval_model=None)
    reproduce.Reproduction(args).all()
    assert all(f[f.index('--data') + 1] == 'imagefolder' and f[f.index('--data-dir') + 1] == '/x/cifar10-jpeg'
               for _, f in calls)
    tags = [f[f.index('--tag') + 1] for _, f in calls]
    assert tags[0] == 'repro-cifar10-jpeg-cpu-s1' and len(tags) == 4
    m = TAG.match(tags[-1])
    assert (m['dataset'], m['schedule'], m['tag']) == ('cifar10-jpeg', 'cpu', 'random-ipc1')
    assert TAG.match('repro-mnist-cpu-dim-s1-fixed-ipc10')['dataset'] == 'mnist'
    monkeypatch.setattr(sys, 'argv', ['reproduce.py', 'cifar10-jpeg'])
    with pytest.raises(SystemExit, match='cifar10-jpeg needs --data-dir'):
        reproduce.main()


# -- soft labels (--labels soft): the teacher first, then the soft twin of every row but the full one ---

def _tags(calls):
    return [f[f.index('--tag') + 1] for _, f in calls]


def test_reproduce_labels_hard_soft_keeps_the_full_rows_classifier_as_the_teacher(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_1.pth')
    args = Namespace(dataset='mnist', schedule='cpu', data_dir='data', device='cpu', rows=['1'], eval_model=None,
                     labels=['hard', 'soft'])
    reproduce.Reproduction(args).all()
    teacher = str(tmp_path / 'results' / 'repro-mnist-cpu-full' / 'teacher.pth')
    tags = _tags(calls)
    # the stage, then the full row keeping its classifier (a soft row needs it), then hard and soft rows
    assert tags == ['repro-mnist-cpu-s1', 'repro-mnist-cpu-full', 'repro-mnist-cpu-dim-s1-onthefly-ipc1',
                    'repro-mnist-cpu-dim-s1-fixed-ipc1', 'repro-mnist-cpu-random-ipc1',
                    'repro-mnist-cpu-dim-s1-onthefly-ipc1-soft', 'repro-mnist-cpu-dim-s1-fixed-ipc1-soft',
                    'repro-mnist-cpu-random-ipc1-soft']
    full = calls[1][1]
    assert full[full.index('--save-classifier') + 1] == teacher and full[full.index('--baseline') + 1] == 'full'
    for _, flags in calls[2:5]:
        assert '--soft-labels' not in flags
    for _, flags in calls[5:]:
        assert flags[flags.index('--soft-labels') + 1] == teacher and '--stack' in flags


def test_reproduce_select_kmeans_adds_kmeans_twins_of_the_fixed_and_random_rows(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_1.pth')
    args = Namespace(dataset='mnist', schedule='cpu', data_dir='data', device='cpu', rows=['1'], eval_model=None,
                     labels=['hard', 'soft'], select=['random', 'kmeans'])
    reproduce.Reproduction(args).all()
    teacher = str(tmp_path / 'results' / 'repro-mnist-cpu-full' / 'teacher.pth')
    rows = [t[len('repro-mnist-cpu-'):] for t in _tags(calls)[2:]]
    # on-the-fly rows have no set to choose; the k-means suffix comes before the labels' one
    assert rows == ['dim-s1-onthefly-ipc1', 'dim-s1-fixed-ipc1', 'dim-s1-fixed-ipc1-kmeans', 'random-ipc1',
                    'random-ipc1-kmeans', 'dim-s1-onthefly-ipc1-soft', 'dim-s1-fixed-ipc1-soft',
                    'dim-s1-fixed-ipc1-kmeans-soft', 'random-ipc1-soft', 'random-ipc1-kmeans-soft']
    for (_, flags), row in zip(calls[2:], rows):
        kmeans = 'kmeans' in row
        assert ('--select' in flags) == kmeans
        if kmeans:  # clustered in the teacher's features
            assert flags[flags.index('--select') + 1] == 'kmeans'
            assert flags[flags.index('--select-features') + 1] == teacher


def test_reproduce_cpu_3x_schedule_is_mnist_with_three_times_stage_1(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_5.pth')
    args = Namespace(dataset='mnist', schedule='cpu-3x', data_dir='data', device='cpu', rows=None, eval_model=None,
                     select=['random', 'kmeans'])
    with pytest.raises(SystemExit, match="takes its teacher from the cpu schedule's run"):
        reproduce.Reproduction(args).all()
    stage1 = calls[0][1]
    assert stage1[stage1.index('--epochs') + 1] == str(3 * reproduce.schedule_for('mnist', 'cpu')['stage1']['epochs'])
    teacher = tmp_path / 'results' / 'repro-mnist-cpu-full' / 'teacher.pth'
    teacher.parent.mkdir(parents=True)
    teacher.write_text('')
    reproduce.Reproduction(args).all()  # stage 1 is done: the rows only
    # the DiM rows only (real images and the full set are the cpu schedule's), k-means in cpu's teacher
    assert [t[len('repro-mnist-cpu-3x-'):] for t in _tags(calls)] == [
        's1', 'dim-s1-onthefly-ipc1', 'dim-s1-fixed-ipc1', 'dim-s1-fixed-ipc1-kmeans',
        'dim-s1-onthefly-ipc10', 'dim-s1-fixed-ipc10', 'dim-s1-fixed-ipc10-kmeans']
    assert all(f[f.index('--select-features') + 1] == str(teacher) for _, f in calls if '--select' in f)
    with pytest.raises(SystemExit, match='no cpu-3x schedule for digits'):
        reproduce.schedule_for('digits', 'cpu-3x')


def test_reproduce_teacher_flag_takes_another_runs_classifier_and_trains_none(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_5.pth')
    teacher = tmp_path / 'results' / 'repro-mnist-cpu-full' / 'teacher.pth'
    monkeypatch.setattr('misc.results.collect', lambda *paths: None)
    argv = ['reproduce.py', 'mnist', '--data-dir', 'data', '--device', 'cpu', '--schedule', 'cpu-3x', '--rows', '1',
            '--select', 'random', 'kmeans', '--labels', 'hard', 'soft', '--teacher', str(teacher)]
    monkeypatch.setattr(sys, 'argv', argv)
    with pytest.raises(SystemExit, match='--teacher .*teacher.pth: no such file'):
        reproduce.main()
    assert calls == []
    teacher.parent.mkdir(parents=True)
    teacher.write_text('')
    reproduce.main()
    tags = _tags(calls)
    assert 'repro-mnist-cpu-3x-full' not in tags and 'repro-mnist-cpu-3x-teacher' not in tags
    for _, flags in calls[1:]:
        if '--select' in flags:
            assert flags[flags.index('--select-features') + 1] == str(teacher)
        if '--soft-labels' in flags:
            assert flags[flags.index('--soft-labels') + 1] == str(teacher)
    # cpu-3x runs DiM rows only: on the fly, fixed and fixed k-means, hard and soft
    assert sum('--select' in f for _, f in calls) == 2 and sum('--soft-labels' in f for _, f in calls) == 3


def test_reproduce_teacher_epochs_trains_each_candidate_and_keeps_the_best_on_held_out_images(tmp_path, monkeypatch):
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_2.pth')
    recorded = reproduce.run
    held_out = {'2': 60.0, '4': 65.0, '8': 65.0}  # a tie: the fewer epochs teach

    def run_with_scores(script, *flags, log):
        seconds = recorded(script, *flags, log=log)
        flags = [str(f) for f in flags]
        tag = flags[flags.index('--tag') + 1]
        if '-teacher-e' in tag:
            epochs = [flags[i + 1] for i, f in enumerate(flags) if f == '--epochs-eval'][-1]
            (tmp_path / 'results' / tag / 'eval.json').write_text(json.dumps({'rows': [{'val_top1': [held_out[epochs]]}]}))
        return seconds
    monkeypatch.setattr(reproduce, 'run', run_with_scores)
    args = Namespace(dataset='cifar10-jpeg', schedule='cpu', data_dir='jpeg', device='cpu', rows=['1', 'full'],
                     eval_model=None, labels=['hard', 'soft'])
    reproduce.Reproduction(args).all()
    tags = [t[len('repro-cifar10-jpeg-cpu-'):] for t in _tags(calls)]
    assert tags[:4] == ['s1', 'teacher-e2', 'teacher-e4', 'teacher-e8']
    for epochs, (_, flags) in zip(('2', '4', '8'), calls[1:4]):
        last = {f: flags[i + 1] for i, f in enumerate(flags) if f in ('--epochs-eval', '--test-interval', '--num-eval')}
        assert last == {'--epochs-eval': epochs, '--test-interval': epochs, '--num-eval': '1'}
        assert flags[flags.index('--baseline') + 1] == 'full' and '--val-per-class' in flags
    chosen = str(tmp_path / 'results' / 'repro-cifar10-jpeg-cpu-teacher-e4' / 'teacher.pth')
    soft = [f for _, f in calls if '--soft-labels' in f]
    assert len(soft) == 3 and all(f[f.index('--soft-labels') + 1] == chosen for f in soft)
    full = calls[tags.index('full')][1]
    assert '--save-classifier' not in full  # the full row is the schedule's one-epoch row, not the teacher


def test_reproduce_labels_soft_resume_adds_a_teacher_row_to_a_finished_run(tmp_path, monkeypatch):
    """The published runs' full rows kept no classifier: --labels soft --resume trains a teacher row of its
    own (one seed, the full row's recipe), then only the soft rows; a second call runs nothing."""
    calls = _record_runs(tmp_path, monkeypatch, 'model_dict_1.pth')
    monkeypatch.setattr('misc.results.collect', lambda *paths: None)
    monkeypatch.setattr(sys, 'argv', ['reproduce.py', 'mnist', '--data-dir', 'data', '--device', 'cpu',
                                      '--rows', '1', 'full'])
    reproduce.main()  # the hard rows, as published: the full row without --save-classifier
    assert all('--save-classifier' not in f for _, f in calls)
    done = len(calls)
    monkeypatch.setattr(sys, 'argv', ['reproduce.py', 'mnist', '--data-dir', 'data', '--device', 'cpu',
                                      '--rows', '1', 'full', '--labels', 'soft', '--resume'])
    reproduce.main()
    added = calls[done:]
    teacher = str(tmp_path / 'results' / 'repro-mnist-cpu-teacher' / 'teacher.pth')
    assert _tags(added) == ['repro-mnist-cpu-teacher', 'repro-mnist-cpu-dim-s1-onthefly-ipc1-soft',
                            'repro-mnist-cpu-dim-s1-fixed-ipc1-soft', 'repro-mnist-cpu-random-ipc1-soft']
    flags = added[0][1]
    assert flags[flags.index('--save-classifier') + 1] == teacher and flags[flags.index('--baseline') + 1] == 'full'
    num_eval = [flags[i + 1] for i, f in enumerate(flags) if f == '--num-eval']
    assert num_eval[-1] == '1'  # one seed: the last --num-eval given counts
    assert flags[flags.index('--epochs-eval', flags.index('--baseline')) + 1] == '1'  # the full row's epochs
    assert all(f[f.index('--soft-labels') + 1] == teacher for _, f in added[1:])
    (tmp_path / 'results' / 'repro-mnist-cpu-teacher' / 'teacher.pth').write_text('')
    done = len(calls)
    reproduce.main()
    assert len(calls) == done  # everything is there: nothing runs again


@pytest.fixture(scope='module')
def soft_reports(reports, tmp_path_factory):
    """The module's reports plus a soft-label random row and the teacher's own row, as misc/reproduce.py
    --labels soft leaves them."""
    import shutil

    from utils.checkpoint import load_teacher
    root = tmp_path_factory.mktemp('soft') / 'results'
    shutil.copytree(reports[0], root)
    info, train, test = load_dataset('digits')
    test = type(test)(test.images[:40], test.labels[:40])
    small = type(train)(train.images[:60], train.labels[:60])
    path = str(root / 'repro-digits-cpu-teacher' / 'teacher.pth')
    own = run_evaluation(eval_args(baseline='full', epochs_eval=1, batch_size=20, save_classifier=path), info, small,
                         test, CPU, NOCTX)
    (root / 'repro-digits-cpu-teacher' / 'eval.json').write_text(json.dumps(own))
    soft = run_evaluation(_args(baseline='random', temperature=20.0), info, train, test, CPU, NOCTX,
                          teacher=load_teacher(path, info))
    (root / 'repro-digits-cpu-random-ipc1-soft').mkdir()
    (root / 'repro-digits-cpu-random-ipc1-soft' / 'eval.json').write_text(json.dumps(soft))
    return root, soft


def test_collect_puts_hard_and_soft_rows_side_by_side(reports, soft_reports, tmp_path):
    root, soft = soft_reports
    out, md = tmp_path / 'results.json', tmp_path / 'RESULTS.md'
    collect(str(root), str(out), str(md))
    records = json.loads(out.read_text())['records']
    assert len(records) == 3 * 3  # the teacher's own row is not a result
    assert {r['labels'] for r in records} == {'hard', 'soft'} and not [r for r in records if r['method'] == 'full']
    held = next(r for r in records if r['labels'] == 'soft' and r['selection'] == 'held-out')
    assert held['method'] == 'random' and held['temperature'] == 20.0
    assert held['teacher']['sha256'] == soft['teacher']['sha256'] and held['teacher']['architecture'] == 'convnet'
    text = md.read_text()
    hard_row = reports[1]['random-ipc1']['rows'][0]
    soft_row = soft['rows'][0]
    hard_cell = f"{hard_row['selected_top1_mean']:.1f} ± {hard_row['selected_top1_std']:.1f}"
    soft_cell = f"{soft_row['selected_top1_mean']:.1f} ± {soft_row['selected_top1_std']:.1f}"
    assert f'| 1 | {hard_cell} |' in text  # the hard table as before
    assert '| ipc | random real subset, hard | random real subset, soft | full training set (hard) |' in text
    assert f'| 1 | {hard_cell} | {soft_cell} | – |' in text
    assert f"Teacher: convnet (sha256 {soft['teacher']['sha256'][:12]})" in text and 'temperature 20' in text
    # records written before soft labels existed are hard, and keep their place
    old = json.loads(out.read_text())
    for record in old['records']:
        for key in ('labels', 'temperature', 'teacher'):
            del record[key]
    out.write_text(json.dumps(old))
    collect(str(tmp_path / 'no-results'), str(out), str(md))
    assert {r['labels'] for r in json.loads(out.read_text())['records']} == {'hard'}


def test_compare_shows_the_labels_of_hard_and_soft_reports(reports, soft_reports):
    root, _ = soft_reports
    paths = [str(root / f'repro-digits-cpu-{t}' / 'eval.json') for t in ('random-ipc1', 'random-ipc1-soft')]
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'compare.py'), *paths], capture_output=True,
                         text=True, check=True).stdout
    assert out.count('| method | labels |') == 1
    assert '| random | hard | fixed |' in out and '| random | soft, T 20 | fixed |' in out
    brief = subprocess.run([sys.executable, os.path.join(ROOT, 'misc', 'compare.py'), '--brief', *paths],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert brief[0].startswith('| trained on | distinct training images | labels | test BN |')
    assert brief[2].split(' | ')[2] == 'hard' and brief[3].split(' | ')[2] == 'soft, T 20'


def test_tables_give_the_full_training_set_once_in_the_first_row():
    """The full set has no ipc: its cell is in the ipc-1 row of each table (hard and soft), blank below."""
    with open(os.path.join(ROOT, 'docs', 'results.json')) as f:
        records = json.load(f)['records']
    full = next(r for r in records if r['dataset'] == 'digits' and r['method'] == 'full' and r['arch'] == 'convnet'
                and r['selection'] == 'held-out' and r['schedule']['name'] == 'cpu')
    cell = f"{full['mean']:.1f} ± {full['std']:.1f}"
    section = markdown(records, {}).split('## digits, cpu schedule, convnet')[1].split('\n## ')[0]
    rows = [line for line in section.splitlines() if line.startswith('| 1 |') or line.startswith('| 10 |')]
    assert len(rows) == 4  # the hard table and the soft one
    assert [row.endswith(f'| {cell} |') for row in rows] == [True, False, True, False]
    assert all(row.endswith('|  |') for row in rows if row.startswith('| 10 |'))
