"""Evaluation protocols on sklearn digits (CPU, tiny): fixed set, stacked seeds, baselines, eval.json."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import validate
from data.datasets import Split, load_dataset
from tests.helpers import eval_args as make_args, save_tiny_generator
from data.errors import UserError
from utils.evaluate import train_on_generator, train_on_set
from utils.runtime import seed_everything
from utils.stacking import train_stacked
from validate import draw_fixed_set, hold_out, markdown_table, random_subset_indices, run_evaluation

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device('cpu')
NOCTX = torch.autocast('cpu', enabled=False)
REPORT_KEYS = {'format', 'protocol', 'method', 'dataset', 'num_classes', 'ipc', 'train_images', 'architectures',
               'num_eval', 'seeds', 'set_seed', 'generator_checkpoint', 'generator_sha256', 'recipe',
               'accuracy_keys', 'rows', 'device', 'hardware', 'amp', 'torch', 'wall_seconds', 'test_bn', 'set_seeds', 'fixed_set',
               'val_per_class', 'val_images', 'storage', 'test_order_seed', 'labels', 'temperature', 'teacher',
               'saved_classifier', 'select', 'select_features', 'candidates'}
ROW_KEYS = {'architecture', 'seeds', 'stacked', 'wall_seconds', 'test_curves'} | {
    f'{k}{s}' for k in ('top1', 'best_top1', 'top5', 'best_top5') for s in ('', '_mean', '_std')}


@pytest.fixture(scope='module')
def digits():
    info, train, test = load_dataset('digits')
    # 30 test images keep the in-process tests fast; the subprocess test uses all 360
    return info, train, Split(test.images[:30], test.labels[:30])


@pytest.fixture(scope='module')
def gen_ckpt(tmp_path_factory, digits):
    """A tiny, untrained generator saved as a stage-1 checkpoint of this repository."""
    path = str(tmp_path_factory.mktemp('gen') / 'gen.pth')
    return path, save_tiny_generator(path, digits[0], seed=0)


@contextmanager
def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_draw_fixed_set_balanced_seeded_eval_mode(digits, gen_ckpt):
    info, G = digits[0], gen_ckpt[1]
    G.train()
    with count_calls(G) as calls:
        images, labels = draw_fixed_set(G, info, 3, seed=1, device=CPU)
    assert len(calls) == 1 and G.training  # one pass for 30 images; G's mode restored
    assert images.shape == (30, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == [c for c in range(10) for _ in range(3)]
    again, _ = draw_fixed_set(G, info, 3, seed=1, device=CPU)
    other, _ = draw_fixed_set(G, info, 3, seed=2, device=CPU)
    assert torch.equal(images, again) and not torch.allclose(images, other)
    # eval mode: an image does not depend on what else is in the pass
    assert torch.allclose(draw_fixed_set(G, info, 1, seed=1, device=CPU, chunk=4)[0],
                          draw_fixed_set(G, info, 1, seed=1, device=CPU)[0], atol=1e-6)


@pytest.mark.parametrize('fixed_set', [False, True])
def test_fixed_protocol_draws_each_set_once(digits, gen_ckpt, fixed_set):
    info, train, test = digits
    G = gen_ckpt[1]
    with count_calls(G) as calls:
        report = run_evaluation(make_args(num_eval=2, epochs_eval=1, ipc=2, fixed_set=fixed_set), info, train,
                                test, CPU, NOCTX, G=G, checkpoint=gen_ckpt[0])
    # one draw per set (seed k's own set, or one shared set); the classifiers only read them
    assert len(calls) == (1 if fixed_set else 2)
    assert report['train_images'] == 20 and report['method'] == 'dim' and report['set_seed'] == 7
    assert report['set_seeds'] == ([7, 7] if fixed_set else [7, 8]) and report['fixed_set'] == fixed_set
    assert report['seeds'] == [7, 8] and not report['rows'][0]['stacked']  # one after another by default
    stacked = run_evaluation(make_args(num_eval=2, epochs_eval=1, ipc=2, fixed_set=fixed_set, stack=True), info,
                             train, test, CPU, NOCTX, G=G)
    assert stacked['rows'][0]['stacked']


def test_each_seed_trains_on_its_own_set_as_a_lone_run_would(digits):
    """Seed k of a K-seed random baseline = a lone run with --seed and --set-seed both seed + k."""
    info, train, test = digits
    both = run_evaluation(make_args(baseline='random', num_eval=2), info, train, test, CPU, NOCTX)
    alone = run_evaluation(make_args(baseline='random', seed=8, set_seed=8), info, train, test, CPU, NOCTX)
    shared = run_evaluation(make_args(baseline='random', num_eval=2, fixed_set=True), info, train, test, CPU,
                            NOCTX)
    assert both['rows'][0]['top1'][1] == alone['rows'][0]['top1'][0]
    assert both['rows'][0]['test_curves'][1] == alone['rows'][0]['test_curves'][0]
    assert shared['rows'][0]['test_curves'][0] == both['rows'][0]['test_curves'][0]  # seed 7: set 7 either way
    assert shared['set_seeds'] == [7, 7]


def test_held_out_images_select_the_epoch_and_nothing_trains_on_them(digits, gen_ckpt, monkeypatch):
    info, train, test = digits
    val, rest = hold_out(train, 10, 3)
    assert len(val) == 30 and len(rest) == len(train) - 30
    assert torch.bincount(val.labels, minlength=10).tolist() == [3] * 10
    flat = lambda split: {tuple(x.flatten().tolist()) for x in split.images}  # noqa: E731
    assert not flat(val) & flat(rest)  # disjoint (digits has no duplicate images across these)
    assert torch.equal(hold_out(train, 10, 3)[0].images, val.images)  # the same for every run
    drawn = []
    original = validate.random_subset_indices
    monkeypatch.setattr(validate, 'random_subset_indices',
                        lambda labels, *a, **k: drawn.append(len(labels)) or original(labels, *a, **k))
    report = run_evaluation(make_args(baseline='random', num_eval=2, epochs_eval=3, val_per_class=3), info, train,
                            test, CPU, NOCTX)
    assert drawn[0] == len(train) and set(drawn[1:]) == {len(train) - 30}  # the subsets come from the rest
    assert report['val_per_class'] == 3 and report['val_images'] == 30
    row = report['rows'][0]
    for k in range(2):  # the selected number is the test accuracy of the selected test
        assert row['selected_epoch'][k] in [e for e, _ in row['test_curves'][k]]
        assert row['selected_top1'][k] == dict(row['test_curves'][k])[row['selected_epoch'][k]]
    assert 'held-out train images' in markdown_table(report)
    onthefly = run_evaluation(make_args(protocol='onthefly', epochs_eval=2, val_per_class=2), info, train, test,
                              CPU, NOCTX, G=gen_ckpt[1])
    assert onthefly['rows'][0]['selected_epoch'][0] in (1, 2) and 0 <= onthefly['rows'][0]['val_top1'][0] <= 100


def test_selection_keeps_the_earliest_best():
    from utils.evaluate import Selection
    sel = Selection()
    for epoch, val, top1 in ((10, 50.0, 40.0), (20, 60.0, 41.0), (30, 60.0, 45.0), (40, 55.0, 47.0)):
        sel.update(epoch, val, top1)
    assert sel.result() == {'val_top1': 60.0, 'selected_top1': 41.0, 'selected_epoch': 20}


def test_storage_compares_the_generator_with_ipc_images(digits, gen_ckpt):
    info, train, test = digits
    G = gen_ckpt[1]
    report = run_evaluation(make_args(num_eval=1, epochs_eval=1, ipc=10), info, train, test, CPU, NOCTX, G=G)
    n = sum(p.numel() for p in G.parameters())
    assert report['storage'] == {'generator_parameters': n, 'generator_bytes_fp32': 4 * n,
                                 'generator_bytes_bf16': 2 * n, 'ipc_images_bytes_uint8': 10 * 10 * 28 * 28}
    rand = run_evaluation(make_args(baseline='random', epochs_eval=1, ipc=10), info, train, test, CPU, NOCTX)
    assert rand['storage']['generator_parameters'] is None and rand['storage']['ipc_images_bytes_uint8'] == 78400


def one_after_another(model_name, train_set, info, test, args, seeds):
    """What validate.py does without --stack: seed_everything(seed), then train_on_set, per seed."""
    runs = []
    for seed in seeds:
        seed_everything(seed)
        model, result = train_on_set(model_name, *train_set, info, test, args, CPU, NOCTX)
        runs.append({'seed': seed, **result, 'state_dict': {k: v.detach() for k, v in model.state_dict().items()}})
    return runs


def assert_same_runs(a, b, rtol, atol, num_test):
    assert [r['seed'] for r in a] == [r['seed'] for r in b]
    for s, r in zip(a, b):
        assert s['state_dict'].keys() == r['state_dict'].keys()
        for name, value in r['state_dict'].items():
            torch.testing.assert_close(s['state_dict'][name], value, rtol=rtol, atol=atol, msg=name)
        for key in ('top1', 'top5', 'best_top1', 'best_top5'):
            assert abs(s[key] - r[key]) <= 100 / num_test + 1e-9  # at most one test image flips


def test_stacked_equals_separate_runs(digits, gen_ckpt):
    """ConvNet (instance norm), float32: K=2 stacked (--stack) == the two seeds trained one after another."""
    info, train, test = digits
    train_set = draw_fixed_set(gen_ckpt[1], info, 1, seed=0, device=CPU)
    # 10 images, batch 4: three steps per epoch, the last one short; CutMix on about half of the steps;
    # two epochs, so the second runs at lr / 10
    args = make_args(epochs_eval=2, batch_size=4, mix_p=0.5, test_interval=2)
    seeds = [5, 6]
    outer = torch.get_rng_state()
    stacked = train_stacked('convnet', [train_set] * 2, info, test, args, CPU, NOCTX, seeds)
    assert torch.equal(torch.get_rng_state(), outer)  # the stacked trainings leave the global RNG as found
    separate = one_after_another('convnet', train_set, info, test, args, seeds)
    assert_same_runs(stacked, separate, rtol=1e-4, atol=1e-5, num_test=len(test))
    # a seed's run does not depend on the other seeds trained with it
    alone = one_after_another('convnet', train_set, info, test, args, [seeds[1]])
    for name, value in alone[0]['state_dict'].items():
        assert torch.equal(value, separate[1]['state_dict'][name]), name
    # and different seeds give different classifiers
    w = [r['state_dict']['fc.weight'] for r in separate]
    assert not torch.allclose(w[0], w[1])


def test_stacked_equals_separate_runs_batchnorm(digits, gen_ckpt):
    """ResNet-10 (BatchNorm: running statistics are stacked buffers, updated per model), in float64:
    a BN ResNet on 2- to 4-image batches turns float32 rounding into percent-level drift within a few
    steps, so exactness is shown where rounding is negligible."""
    info, train, test = digits
    images, labels = draw_fixed_set(gen_ckpt[1], info, 1, seed=0, device=CPU)
    train_set = (images.double(), labels)
    args = make_args(epochs_eval=1, batch_size=4, mix_p=0.5)
    seeds = [5, 6]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        stacked = train_stacked('resnet10', [train_set] * 2, info, test, args, CPU, NOCTX, seeds)
        separate = one_after_another('resnet10', train_set, info, test, args, seeds)
    finally:
        torch.set_default_dtype(default)
    assert stacked is not None and stacked[0]['state_dict']['fc.weight'].dtype == torch.float64
    assert_same_runs(stacked, separate, rtol=1e-9, atol=1e-10, num_test=len(test))
    bn = 'stem.2.running_mean'
    assert stacked[0]['state_dict'][bn].abs().sum() > 0  # running statistics did update
    assert int(stacked[1]['state_dict']['stem.2.num_batches_tracked']) == 3


def test_random_subset_ipc_per_class_and_seeded(digits):
    train = digits[1]
    idx = random_subset_indices(train.labels, 10, 5, seed=1)
    labels = train.labels[idx]
    assert labels.tolist() == [c for c in range(10) for _ in range(5)]
    assert len(set(idx.tolist())) == 50
    assert torch.equal(idx, random_subset_indices(train.labels, 10, 5, seed=1))
    assert not torch.equal(idx, random_subset_indices(train.labels, 10, 5, seed=2))
    with pytest.raises(UserError, match='fewer than --ipc'):
        random_subset_indices(train.labels, 10, 10_000, seed=1)


def test_baselines_random_and_full(digits):
    info, train, test = digits
    small = Split(train.images[:20], train.labels[:20])  # "full" = every image of the split it is given
    rand = run_evaluation(make_args(baseline='random', ipc=1, epochs_eval=1, num_eval=2), info, train, test,
                          CPU, NOCTX)
    full = run_evaluation(make_args(baseline='full', epochs_eval=1, batch_size=20), info, small, test, CPU, NOCTX)
    assert rand['method'] == 'random' and rand['train_images'] == 10 and rand['ipc'] == 1
    assert rand['generator_checkpoint'] is None and rand['set_seed'] == 7
    assert full['method'] == 'full' and full['train_images'] == 20 and full['ipc'] is None
    for report in (rand, full):
        assert set(report) == REPORT_KEYS and set(report['rows'][0]) == ROW_KEYS
        assert report['protocol'] == 'fixed'
        # which kernels ran: a CPU with another instruction set gives other bits
        assert report['hardware'].endswith(f", {torch.backends.cpu.get_cpu_capability()} kernels")
    assert '| random | fixed | running | digits | 1 | convnet | 2 |' in markdown_table(rand)
    assert '| full | fixed | running | digits | all | convnet | 1 |' in markdown_table(full)


def test_onthefly_single_seed_is_the_former_validation(digits, gen_ckpt):
    """--protocol onthefly --num-eval 1 is exactly seed_everything(seed) + train_on_generator."""
    info, _, test = digits
    G = gen_ckpt[1]
    args = make_args(protocol='onthefly', epochs_eval=1, batch_size=10, ipc=1, mixup_net='none')
    new = run_evaluation(args, info, None, test, CPU, NOCTX, G=G)['rows'][0]
    seed_everything(args.seed)
    old = train_on_generator(G, 'convnet', info, test, args, CPU, NOCTX, extra_iteration=False)
    assert new['seeds'] == [args.seed]
    assert (new['top1'], new['best_top1'], new['top5']) == ([old['top1']], [old['best_top1']], [old['top5']])


def test_validate_flag_errors(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['validate.py', '--baseline', 'random', '--protocol', 'onthefly'])
    with pytest.raises(UserError, match='cannot use --protocol onthefly'):
        validate.main()
    monkeypatch.setattr(sys, 'argv', ['validate.py', '--protocol', 'fixed'])
    with pytest.raises(UserError, match='needs --pretrain-weight'):
        validate.main()
    monkeypatch.setattr(sys, 'argv', ['validate.py', '--baseline', 'full', '--num-eval', '0'])
    with pytest.raises(UserError, match='--num-eval must be at least 1'):
        validate.main()
    monkeypatch.setattr(sys, 'argv', ['validate.py', '--baseline', 'full', '--stack', '--no-stack'])
    with pytest.raises(UserError, match='contradict'):
        validate.main()


def test_validate_end_to_end_fixed_two_seeds(gen_ckpt, tmp_path):
    cmd = [sys.executable, 'validate.py', '--pretrain-weight', gen_ckpt[0], '--protocol', 'fixed', '--num-eval', '2',
           '--ipc', '1', '--epochs-eval', '1', '--batch-size', '10', '--tag', 'e2e', '--no-progress',
           '--output-dir', str(tmp_path / 'results'), '--logs-dir', str(tmp_path / 'logs')]
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'selected on test' in proc.stdout and '| dim | fixed | running | digits | 1 | convnet | 2 |' in proc.stdout
    with open(tmp_path / 'results' / 'e2e' / 'eval.json') as f:
        report = json.load(f)
    assert set(report) == REPORT_KEYS and set(report['rows'][0]) == ROW_KEYS
    assert report['protocol'] == 'fixed' and report['method'] == 'dim' and report['dataset'] == 'digits'
    assert report['ipc'] == 1 and report['num_eval'] == 2 and report['seeds'] == [3407, 3408]
    assert report['generator_checkpoint'] == os.path.abspath(gen_ckpt[0])
    assert len(report['generator_sha256']) == 64
    row = report['rows'][0]
    assert row['architecture'] == 'convnet' and len(row['top1']) == 2 and len(row['best_top1']) == 2
    assert row['top1_mean'] == pytest.approx(sum(row['top1']) / 2)
    assert all(b >= t for b, t in zip(row['best_top1'], row['top1']))
