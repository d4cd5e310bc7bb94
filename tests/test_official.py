"""Faithfulness to the official command lines and evaluation: every official flag parses under its
official name and default, the flags that act in the official code act here, and classifiers are
tested as the official code tests them (train-mode BatchNorm) unless --test-bn says otherwise."""
import json
import sys

import pytest
import torch

import gen_condense
import pool_match
import validate
from conftest import make_imagefolder
from data.datasets import DatasetInfo, Split, normalize, pass_order
from models import create_model
from utils.cli import NO_EFFECT
import utils.evaluate as evaluate
from utils.stacking import ClassifierGroup, group_test
from utils.runtime import FastPath

# The official parsers, flag -> (default, a non-default value), from the reference notes
# (shared/reference/DIM_REFERENCE.md, "Flags"). A value of True marks a store_true switch.
ALL_THREE = {
    '--ipc': (50, 7), '--epochs-eval': (1000, 3), '--eval-lr': (0.01, 0.02), '--momentum': (0.9, 0.5),
    '--weight-decay': (5e-4, 1e-3), '--eval-model': (['convnet'], ['resnet10']), '--dim-noise': (100, 110),
    '--num-workers': (4, 2), '--print-freq': (50, 7), '--eval-interval': (10, 3), '--test-interval': (200, 9),
    '--data': ('cifar10', 'mnist'), '--num-classes': (10, 10), '--data-dir': ('./data', '/d'),
    '--output-dir': ('./results/', '/o'), '--logs-dir': ('./logs/', '/l'),
    '--aug-type': ('color_crop_cutout', 'color_crop'), '--mixup-net': ('cut', 'none'), '--bias': (False, True),
    '--fc': (False, True), '--mix-p': (-1.0, 0.5), '--beta': (1.0, 0.3), '--tag': ('test', 'x'),
    '--seed': (3407, 1),
}
OWN = {
    'gen_condense.py': {'--batch-size': (128, 64), '--epochs': (150, 5), '--lr': (1e-4, 2e-4)},
    'pool_match.py': {'--batch-size': (64, 32), '--epochs': (100, 5), '--lr': (5e-6, 1e-5),
                      '--epochs-match': (100, 5), '--epochs-match-train': (16, 4), '--match-coeff': (0.001, 0.1),
                      '--match-model': ('convnet', 'resnet10'), '--match': ('logit', 'feat'),
                      '--fix-disc': (False, True), '--weight': ('', 'w.pth'), '--match-aug': (False, True),
                      '--metric': ('l1', 'cos')},
    'validate.py': {'--batch-size': (128, 64), '--epochs': (250, 5), '--lr': (1e-4, 2e-4), '--epochs-match': (100, 5),
                    '--epochs-match-train': (16, 4), '--match-coeff': (0.001, 0.1),
                    '--match-model': ('convnet', 'resnet10'), '--fix-disc': (False, True),
                    '--pretrain-weight': ('', 'w.pth'), '--match-aug': (False, True), '--metric': ('l1', 'mse')},
}
MODULES = {'gen_condense.py': gen_condense, 'pool_match.py': pool_match, 'validate.py': validate}
# defaults that are deliberately not the official parser's (README, "Differences from the official code"):
# --data/--num-classes/--data-dir come from the checkpoint or the data when not given, validate.py's
# --pretrain-weight has no default folder, and --match defaults to the paper's 'logit', not 'grad'
RESOLVED_LATER = {'--data': None, '--num-classes': None, '--data-dir': None}


def _command_line(flags):
    argv = []
    for flag, (_, value) in flags.items():
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *value]
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize('script', sorted(OWN))
def test_every_official_flag_parses_with_non_default_values(script):
    flags = {**ALL_THREE, **OWN[script]}
    parser = MODULES[script].get_parser()
    args = parser.parse_args(_command_line(flags))
    for flag, (_, value) in flags.items():
        assert getattr(args, flag[2:].replace('-', '_')) == value, flag
    defaults = parser.parse_args([])
    for flag, (default, _) in flags.items():
        expected = RESOLVED_LATER.get(flag, default)
        if script == 'validate.py' and flag == '--pretrain-weight':
            expected = ''  # the official default ./logs/ is a folder, never a checkpoint
        assert getattr(defaults, flag[2:].replace('-', '_')) == expected, flag


@pytest.mark.parametrize('script,inert', [
    ('gen_condense.py', ['--bias', '--fc']),
    ('validate.py', ['--bias', '--fc', '--match-aug', '--metric', '--epochs-match-train', '--match-coeff',
                     '--match-model', '--fix-disc', '--epochs-match']),
    ('pool_match.py', ['--match-coeff', '--match-model', '--fix-disc', '--epochs-match']),
])
def test_help_says_which_official_flags_have_no_effect(script, inert):
    parser = MODULES[script].get_parser()
    helps = {opt: action.help for action in parser._actions for opt in action.option_strings}
    for flag in inert:
        assert helps[flag] == NO_EFFECT, flag
    if script == 'pool_match.py':
        for flag in ('--bias', '--fc', '--metric', '--match-aug', '--epochs-match-train'):
            assert helps[flag] != NO_EFFECT, flag
    assert NO_EFFECT in ' '.join(parser.format_help().split())  # and --help shows it


# ----------------------------------------------------------------------------------------------
# flags that act: --momentum / --weight-decay (validation classifiers and pool models), --eval-lr as
# the pool model's learning rate

@pytest.fixture
def sgd_calls(monkeypatch):
    calls = []
    original = torch.optim.SGD.__init__

    def spy(self, params, *args, **kwargs):
        calls.append(kwargs)
        original(self, params, *args, **kwargs)
    monkeypatch.setattr(torch.optim.SGD, '__init__', spy)
    return calls


def _run(module, argv, monkeypatch):
    monkeypatch.setattr(sys, 'argv', [module.__name__] + [str(a) for a in argv])
    try:
        module.run(module.main)
    except SystemExit as e:
        return e.code
    return 0


def _tiny(data):
    return ['--data', 'imagefolder', '--data-dir', data, '--img-size', '28', '--width', '8', '--batch-size', '4',
            '--ipc', '1', '--epochs-eval', '1', '--test-interval', '1', '--no-progress', '--device', 'cpu']


@pytest.fixture
def tiny_data(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    return make_imagefolder(tmp_path / 'imgs')


@pytest.mark.parametrize('extra,expected', [
    ([], dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    (['--eval-lr', '0.05', '--momentum', '0.3', '--weight-decay', '0'], dict(lr=0.05, momentum=0.3, weight_decay=0.0)),
    (['--eval-lr', '0.05', '--pool-lr', '0.2', '--momentum', '0.3'], dict(lr=0.2, momentum=0.3, weight_decay=5e-4)),
])
def test_pool_model_and_validation_sgd_take_the_official_flags(tiny_data, monkeypatch, sgd_calls, extra, expected):
    assert _run(gen_condense, _tiny(tiny_data) + ['--epochs', '1', '--eval-interval', '5', '--tag', 'g'],
                monkeypatch) == 0
    assert _run(pool_match, _tiny(tiny_data) + ['--weight', 'results/g/last.pth', '--epochs', '1', '--tag', 'm',
                                                '--eval-interval', '1', '--epochs-match-train', '1', '--pool',
                                                'convnet'] + extra, monkeypatch) == 0
    pool = torch.load('results/m/last.pth', weights_only=False)['pool']['optimizer']['param_groups'][0]
    assert {k: pool[k] for k in expected} == pytest.approx(expected)
    # the validation classifier of stage 2: --eval-lr, --momentum, --weight-decay (never --pool-lr)
    validation = dict(expected, lr=0.05 if '--eval-lr' in extra else 0.01)
    assert any({k: c.get(k) for k in validation} == pytest.approx(validation) for c in sgd_calls), sgd_calls


def test_validate_trains_with_momentum_and_weight_decay(tiny_data, monkeypatch, sgd_calls):
    assert _run(validate, _tiny(tiny_data) + ['--baseline', 'random', '--momentum', '0.1', '--weight-decay', '0.01',
                                              '--tag', 'v'], monkeypatch) == 0
    assert [(c['momentum'], c['weight_decay']) for c in sgd_calls] == [(0.1, 0.01)]
    report = json.load(open('results/v/eval.json'))
    assert report['recipe']['momentum'] == 0.1 and report['recipe']['weight_decay'] == 0.01


# ----------------------------------------------------------------------------------------------
# --test-bn

INFO = DatasetInfo('toy', 3, 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 'cifar')


def _toy_test_split(n=70):
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


def _by_hand(model, split, batch_size, train_mode):
    model.train(train_mode)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            x = normalize(split.images[i:i + batch_size].float() / 255, INFO.mean, INFO.std)
            correct += (model(x).argmax(1) == split.labels[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(split)


def test_batch_mode_tests_in_train_mode_on_test_batches_of_the_batch_size():
    torch.manual_seed(0)
    model = create_model('resnet10', 10, 3, 32)
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    split = _toy_test_split()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def fresh():
        model.load_state_dict(state)
        return model
    batch32 = _by_hand(fresh(), split, 32, True)
    running = _by_hand(fresh(), split, 500, False)
    assert evaluate.test(fresh(), split, INFO, torch.device('cpu'), torch.autocast('cpu', enabled=False),
                         bn='batch', batch_size=32)[0] == pytest.approx(batch32)
    assert evaluate.test(fresh(), split, INFO, torch.device('cpu'), torch.autocast('cpu', enabled=False),
                         bn='running')[0] == pytest.approx(running)
    # the batch size matters in batch mode (a different last batch): it must be the one asked for
    outcomes = {evaluate.test(fresh(), split, INFO, torch.device('cpu'), torch.autocast('cpu', enabled=False),
                              bn='batch', batch_size=b)[0] for b in (7, 32, 70)}
    assert len(outcomes) > 1
    # stacked models test the same way as one model alone
    group = ClassifierGroup([fresh().train(), create_model('resnet10', 10, 3, 32)])
    top1, _ = group_test(group, split, INFO, torch.device('cpu'), torch.autocast('cpu', enabled=False),
                         bn='batch', batch_size=32)
    assert top1[0] == pytest.approx(batch32)


def test_test_bn_defaults_follow_the_protocol_and_reach_the_report(tiny_data, monkeypatch):
    assert _run(gen_condense, _tiny(tiny_data) + ['--epochs', '1', '--eval-interval', '1', '--tag', 'g',
                                                  '--eval-model', 'resnet10'], monkeypatch) == 0
    assert torch.load('results/g/last.pth', weights_only=False)['args']['test_bn'] == 'batch'
    for extra, expected in (([], 'batch'), (['--protocol', 'fixed'], 'running'),
                            (['--protocol', 'fixed', '--test-bn', 'batch'], 'batch'),
                            (['--test-bn', 'running'], 'running')):
        tag = f"v{len(extra)}{expected}"
        assert _run(validate, _tiny(tiny_data) + ['--pretrain-weight', 'results/g/last.pth', '--tag', tag,
                                                  '--eval-model', 'resnet10'] + extra, monkeypatch) == 0
        report = json.load(open(f'results/{tag}/eval.json'))
        assert report['test_bn'] == expected and report['recipe']['test_batch_size'] == (4 if expected == 'batch' else 500)
    assert _run(validate, _tiny(tiny_data) + ['--baseline', 'random', '--tag', 'rand'], monkeypatch) == 0
    assert json.load(open('results/rand/eval.json'))['test_bn'] == 'running'


# ----------------------------------------------------------------------------------------------
# the match input

def _pool(match_aug):
    """A real Pool on a CIFAR-like dataset, its pool net replaced by a recorder of what it sees."""
    info = DatasetInfo('toy', 3, 32, 10, (0.491, 0.482, 0.447), (0.202, 0.199, 0.201), 'cifar')
    args = pool_match.get_parser().parse_args(['--match-aug'] if match_aug else [])
    fast = FastPath.plain(torch.device('cpu'))
    pool = pool_match.Pool(args, info, fast, train_stream=None, ctx=fast.ctx())
    pool.build('convnet')
    seen = []
    pool.net = lambda x: seen.append(x) or x.flatten(1)[:, :10]
    pool.match_aug = lambda x: x
    return pool, seen


def test_generated_images_are_normalised_in_float32_under_bf16():
    pool, _ = _pool(match_aug=True)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    half = pool.to_pool_input(x.to(torch.bfloat16))
    assert half.dtype == torch.float32
    # the same constants as the real half: exactly fp32 normalisation of the (bf16-rounded) pixels
    torch.testing.assert_close(half, normalize(x.to(torch.bfloat16).float(), pool.info.mean, pool.info.std),
                               rtol=0, atol=0)


@pytest.mark.parametrize('match_aug', [True, False])
def test_match_input_is_normalised_only_with_match_aug(match_aug):
    pool, seen = _pool(match_aug)
    real, fake = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    pool.match_loss(real, fake.to(torch.bfloat16), torch.tensor([0, 1]))
    expect_real = normalize(real, pool.info.mean, pool.info.std) if match_aug else real
    torch.testing.assert_close(seen[0], expect_real)
    assert all(x.dtype == torch.float32 for x in seen)


def test_pass_order_is_a_permutation():
    order = pass_order(1000, 'cpu', torch.Generator().manual_seed(1))
    assert torch.equal(order.sort().values, torch.arange(1000))
