"""The three stages chained as a user runs them, on real data (digits), with a tiny schedule."""
import json
import os

import pytest
import torch
from PIL import Image

from tests.helpers import TINY, run_script

# width 32 at lr 1e-3 for 10 epochs: the stages chained in about a minute on 2 cores (too short for the generator
# to become class-conditional, about 25% by misc/diagnose.py; the quick start runs a longer schedule)
STAGE1_EPOCHS = 10
WIDTH = 32


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('pipeline')
    s1 = run_script('gen_condense.py', *TINY, '--width', WIDTH, '--tag', 'gan', '--epochs', STAGE1_EPOCHS, '--lr', '1e-3',
                    '--eval-interval', STAGE1_EPOCHS, cwd=cwd)
    assert s1.returncode == 0, s1.stderr
    s2 = run_script('pool_match.py', *TINY, '--tag', 'match', '--match', 'logit', '--match-aug',
                    '--weight', f'results/gan/model_dict_{STAGE1_EPOCHS - 1}.pth', '--epochs', 1,
                    '--eval-interval', 1, '--epochs-match-train', 1, '--pool', 'convnet', 'resnet18_ap', cwd=cwd)
    assert s2.returncode == 0, s2.stderr
    s3 = run_script('validate.py', *TINY, '--tag', 'test', '--pretrain-weight', 'results/match/model_dict_convnet.pth',
                    '--epochs-eval', 20, '--test-interval', 10, '--ipc', 50, '--batch-size', 64, cwd=cwd)
    assert s3.returncode == 0, s3.stderr
    return cwd, s1, s2, s3


def test_stage1_files(pipeline):
    cwd, s1, _, _ = pipeline
    res = cwd / 'results' / 'gan'
    assert (res / f'model_dict_{STAGE1_EPOCHS - 1}.pth').exists() and (res / 'last.pth').exists()
    grids = sorted(os.listdir(res / 'outputs'))
    assert grids == sorted(f'img_{e}.png' for e in range(STAGE1_EPOCHS))  # from 0, as the official names
    # 10 rows of draws x 10 classes of 28-pixel images with 2-pixel padding
    assert Image.open(res / 'outputs' / grids[0]).size == (302, 302)
    logs = cwd / 'logs' / 'gan'
    assert json.load(open(logs / 'args.json'))['data'] == 'digits'
    assert 'validation after epoch' in (logs / 'logs.txt').read_text()
    assert 'stage 1: digits' in s1.stdout


def test_stage1_checkpoint_describes_itself(pipeline):
    cwd, _, _, _ = pipeline
    ckpt = torch.load(cwd / 'results' / 'gan' / f'model_dict_{STAGE1_EPOCHS - 1}.pth', weights_only=False)
    for key in ('generator', 'discriminator', 'optim_g', 'optim_d', 'dataset', 'generator_config', 'epoch', 'args'):
        assert key in ckpt
    assert ckpt['generator_config'] == dict(num_classes=10, channels=1, img_size=28, dim_noise=100, width=WIDTH)
    assert ckpt['epoch'] == STAGE1_EPOCHS


def test_tensorboard_curves(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cwd = pipeline[0]
    for tag, wanted in (('gan', {'Loss/G', 'Loss/D', 'Loss/GP', 'Acc/D_real', 'Eval/convnet/top1',
                                 'Eval/convnet/best_top1'}),
                        ('match', {'Loss/match'})):
        acc = EventAccumulator(str(cwd / 'logs' / tag))
        acc.Reload()
        assert wanted <= set(acc.Tags()['scalars']), acc.Tags()['scalars']
        assert 'Samples' in acc.Tags()['images']


def test_stage2_saves_the_best_per_eval_model_and_reads_the_dataset_from_the_checkpoint(pipeline):
    cwd, _, s2, _ = pipeline
    assert (cwd / 'results' / 'match' / 'model_dict_convnet.pth').exists()
    assert 'stage 2: digits' in s2.stdout and 'new best for convnet' in s2.stdout
    assert json.load(open(cwd / 'logs' / 'match' / 'args.json'))['lr'] == 5e-6


def test_validation_beats_chance(pipeline):
    cwd, _, _, s3 = pipeline
    row, = json.load(open(cwd / 'results' / 'test' / 'eval.json'))['rows']
    final, best = row['top1_mean'], row['best_top1_mean']
    assert row['architecture'] == 'convnet' and best >= final
    assert final > 20.0, s3.stdout  # chance is 10% on ten classes
    assert '| dim | onthefly | batch | digits | 50 | convnet |' in s3.stdout  # the printed table
    assert 'one epoch = 7 iterations x 64 = 448 generated images' in s3.stdout


def test_checkpoint_of_other_data_is_refused(pipeline, tmp_path):
    cwd = pipeline[0]
    out = run_script('validate.py', '--data', 'mnist', '--data-dir', tmp_path, '--pretrain-weight',
                     cwd / 'results' / 'gan' / f'model_dict_{STAGE1_EPOCHS - 1}.pth', cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert 'trained on digits, but --data is mnist' in out.stderr
