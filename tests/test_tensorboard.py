"""What tensorboard shows of each stage: stage 3's curves per classifier and seed, stage 2's pool model,
every stage's arguments. Read back from the event files with tensorboard's own EventAccumulator."""
import glob
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import TINY, run_script, save_tiny_generator

EPOCHS, SEEDS = 3, (3407, 3408)


def events(logs_dir):
    (path,) = glob.glob(str(logs_dir / 'events.out.tfevents.*'))
    acc = EventAccumulator(path, size_guidance={'scalars': 0, 'tensors': 0})
    acc.Reload()
    return acc


def curve(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def texts(acc, name):
    """The text entries of `name` (add_text writes them as string tensors under NAME/text_summary)."""
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f'{name}/text_summary')]


def validate(tmp_path, tag, *flags):
    out = run_script('validate.py', '--pretrain-weight', tmp_path / 'g.pth', '--data', 'digits', '--ipc', '2',
                     '--num-eval', len(SEEDS), '--epochs-eval', EPOCHS, '--test-interval', 1, '--val-per-class', 2,
                     '--no-progress', '--device', 'cpu', '--tag', tag, *flags, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return events(tmp_path / 'logs' / tag)


@pytest.fixture(scope='module')
def generator(tmp_path_factory):
    from data.datasets import load_dataset
    folder = tmp_path_factory.mktemp('tb')
    save_tiny_generator(str(folder / 'g.pth'), load_dataset('digits')[0], seed=0)
    return folder


@pytest.mark.parametrize('protocol', ['fixed', 'onthefly'])
def test_every_classifier_and_seed_has_its_curves(generator, protocol):
    acc = validate(generator, protocol, '--protocol', protocol)
    scalars = set(acc.Tags()['scalars'])
    for seed in SEEDS:
        prefix = f'convnet/seed{seed}'
        # a test every epoch: one point per test at its epoch (counted from 1), and one loss point per epoch
        for name in ('test_top1', 'test_top5', 'val_top1', 'train_loss', 'train_top1', 'lr'):
            assert [step for step, _ in curve(acc, f'{prefix}/{name}')] == list(range(1, EPOCHS + 1)), name
        assert all(0 <= v <= 100 for _, v in curve(acc, f'{prefix}/test_top1'))
        assert all(v > 0 for _, v in curve(acc, f'{prefix}/train_loss'))
    with open(generator / 'results' / protocol / 'eval.json') as f:
        report = json.load(f)
    if protocol == 'fixed':  # the curve eval.json records is the one tensorboard shows
        for seed, recorded in zip(SEEDS, report['rows'][0]['test_curves']):
            shown = curve(acc, f'convnet/seed{seed}/test_top1')
            assert [s for s, _ in shown] == [e for e, _ in recorded]
            assert [v for _, v in shown] == pytest.approx([v for _, v in recorded], abs=1e-4)
        lrs = [v for _, v in curve(acc, f'convnet/seed{SEEDS[0]}/lr')]
        assert lrs == pytest.approx([0.01, 0.01, 0.001])  # x0.1 after the first half of the epochs
    assert f'Eval/dim/{protocol}/convnet/top1' in scalars  # the summary over the seeds stays
    (args,) = texts(acc, 'args')  # the full arguments as a text entry, the resolved protocol among them
    assert f'    protocol: {protocol}' in args.splitlines() and f'    seed: {SEEDS[0]}' in args.splitlines()


def test_a_stacked_run_draws_the_curves_of_one_after_another(generator):
    one_by_one = validate(generator, 'single', '--protocol', 'fixed')
    stacked = validate(generator, 'stacked', '--protocol', 'fixed', '--stack')
    for seed in SEEDS:
        for name in ('test_top1', 'val_top1', 'train_loss', 'train_top1', 'lr'):
            tag = f'convnet/seed{seed}/{name}'
            a, b = curve(one_by_one, tag), curve(stacked, tag)
            assert [s for s, _ in a] == [s for s, _ in b]
            assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-4, abs=1e-3), tag


def test_soft_labels_have_no_training_accuracy(generator):
    teacher = generator / 'teacher.pth'
    out = run_script('validate.py', '--data', 'digits', '--baseline', 'full', '--epochs-eval', 1, '--tag', 'full',
                     '--save-classifier', teacher, '--no-progress', '--device', 'cpu', cwd=generator)
    assert out.returncode == 0, out.stderr
    acc = validate(generator, 'soft', '--protocol', 'fixed', '--soft-labels', teacher)
    scalars = set(acc.Tags()['scalars'])
    assert f'convnet/seed{SEEDS[0]}/train_loss' in scalars and f'convnet/seed{SEEDS[0]}/train_top1' not in scalars


def test_stage_2_shows_the_pool_model_of_each_epoch(tmp_path):
    out = run_script('gen_condense.py', *TINY, '--epochs', 1, '--eval-interval', 1, '--tag', 's1', cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = run_script('pool_match.py', *TINY, '--epochs', 2, '--eval-interval', 5, '--tag', 's2', '--pool', 'convnet',
                     'resnet10', '--epochs-match-train', 1, '--weight', tmp_path / 'results' / 's1' / 'model_dict_0.pth',
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    acc = events(tmp_path / 'logs' / 's2')
    drawn = curve(acc, 'Pool/model_index')
    assert len(drawn) == 2 and drawn[0][0] == 0 and all(v in (0, 1) for _, v in drawn)
    printed = [line.split('pool model ')[1] for line in out.stdout.splitlines() if ': pool model ' in line]
    assert [['convnet', 'resnet10'][int(v)] for _, v in drawn] == printed
    assert [t.split(': ')[1].split(' ')[0] for t in texts(acc, 'Pool/model')] == printed
    assert '    pool: [\'convnet\', \'resnet10\']' in texts(acc, 'args')[0].splitlines()
    assert '    tag: s1' in texts(events(tmp_path / 'logs' / 's1'), 'args')[0].splitlines()
