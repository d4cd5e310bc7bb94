"""This repository against numbers the official code computed (tests/golden/, its README gives each
protocol): stage 1, stage 2 (pool matching), the on-the-fly validation and its test. The
augmentation ops are pinned in tests/test_golden_augment.py.

Every file was computed in float64 on the CPU. We rebuild each input from the file's own protocol
(seeds, batches, initial weights, optimizers), run the functions a user's run calls
(gen_condense.train_iteration, pool_match.train_iteration with its Pool, utils/evaluate's
generated_batch, classifier_step and test) and compare fingerprints of every network after every
iteration. Two implementations that differ in a loss, the order of a random draw, an optimizer, the
pixel scaling or a BatchNorm update drift apart far beyond the tolerance after one iteration.

Tolerance, as the stage-1 test has always used: 1e-9 relative for norms, sums of absolute values and
listed values; a sum (which may be near zero, being signed) to 1e-9 of the sum of absolute values of the
same tensor. A listed value near zero (a logit of 2e-5, say) is held to 1e-9 of the largest listed
value of its list instead: relative error is meaningless at zero. Widths as the official nets (196);
small batches keep the files to seconds each.
"""
import contextlib
import dataclasses
import functools
import json
import os

import pytest
import torch

import pool_match
from data.datasets import DATASETS, Split
from gen_condense import train_iteration
from models import Discriminator, Generator
from utils.augment import DiffAug
from utils import evaluate
from utils.evaluate import build_classifier, classifier_optimizer, classifier_step, generated_batch
from utils.run import build_gan
from utils.runtime import FastPath, make_scaler

from helpers import ROOT

GOLDEN = os.path.join(ROOT, 'tests', 'golden')  # in the repository: a clone with nothing beside it tests itself
SHAPES = {'mnist': (1, 28), 'cifar10': (3, 32)}
TOL = 1e-9
CPU = torch.device('cpu')


def load_golden(name):
    with open(os.path.join(GOLDEN, f'{name}.json')) as f:  # a missing fixture fails: never a skip
        return json.load(f)


def fingerprint(tensors):
    flat = torch.cat([t.detach().flatten() for t in tensors])
    # first / last four of the concatenation (a 1-channel generator's last bias has one value)
    return dict(sum=flat.sum().item(), norm=flat.norm().item(), abs_sum=flat.abs().sum().item(),
                first=flat[:4].tolist(), last=flat[-4:].tolist())


def close(got, want, what, tol=TOL):
    assert got == pytest.approx(want, rel=tol, abs=0), (what, got, want)


def check(name, got, want, tol=TOL):
    scale = want['abs_sum']
    assert abs(got['sum'] - want['sum']) <= tol * scale, (name, 'sum', got['sum'], want['sum'])
    close(got['abs_sum'], want['abs_sum'], (name, 'abs_sum'), tol)
    close(got['norm'], want['norm'], (name, 'norm'), tol)
    for key in ('first', 'last'):
        if key in want:  # the floor for values near zero: tol of the list's largest magnitude
            floor = tol * max(abs(v) for v in want[key])
            assert got[key] == pytest.approx(want[key], rel=tol, abs=floor), (name, key, got[key], want[key])


def check_module(name, module, want):
    check(name, fingerprint(list(module.parameters())), want)
    if 'buffers' in want:  # BatchNorm running statistics (the generator, the ResNets)
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        check(f'{name} buffers', fingerprint(buffers), want['buffers'])


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def official_gan(data):
    """G and D from torch.manual_seed(123) at the official width, Adam(1e-4, betas (0, 0.9)): the project's
    nets from this seed carry the official initial weights."""
    channels, size = SHAPES[data]
    torch.manual_seed(123)
    cfg = dict(num_classes=10, channels=channels, img_size=size, width=196)
    nets = build_gan(dict(cfg, dim_noise=100), cfg, FastPath.plain(CPU), lr=1e-4)
    assert isinstance(nets.G, Generator) and isinstance(nets.D, Discriminator)
    nets.G.train(), nets.D.train()
    return nets


def uint8_batches(data, count, batch, seed):
    """`count` (images, labels) batches drawn from torch.Generator().manual_seed(seed): images then
    labels, per batch, as every file's protocol draws them."""
    channels, size = SHAPES[data]
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, (batch, channels, size, size), generator=g, dtype=torch.uint8)
        batches.append((images, torch.randint(0, 10, (batch,), generator=g)))
    return batches


def dataset(protocol):
    """The repository's statistics of the protocol's dataset, which must be the official ones."""
    info = DATASETS[protocol['data']]
    assert list(info.mean) == protocol['mean'] and list(info.std) == protocol['std']
    return info


# ---------------------------------------------------------------------------------------------------
# stage 1
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('data', list(SHAPES))
def test_stage1_matches_official_golden_values(data, float64):
    golden = load_golden(f'stage1_{data}')
    protocol = golden['protocol']
    assert protocol['data'] == data
    nets = official_gan(data)
    check_module('G at start', nets.G, golden['start']['G'])
    check_module('D at start', nets.D, golden['start']['D'])
    for i, (images, labels) in enumerate(uint8_batches(data, protocol['iters'], protocol['batch'], seed=7)):
        torch.manual_seed(1000 + i)
        metrics = train_iteration(nets, images, labels, contextlib.nullcontext())
        assert metrics['loss_g'].dtype == metrics['loss_d'].dtype == torch.float64, 'the step left float64'
        check_module(f'G after iteration {i}', nets.G, golden['after'][i]['G'])
        check_module(f'D after iteration {i}', nets.D, golden['after'][i]['D'])


# ---------------------------------------------------------------------------------------------------
# stage 2
# ---------------------------------------------------------------------------------------------------
class FirstEntries:
    """The pool model's training stream of the protocol: every generator step's pool steps take the
    first entries of a fixed list (the official loader restarts for each generator step), no draw."""

    def __init__(self, batches):
        self.batches = batches
        self.images = batches[0][0]  # where the images live (the Pool asks for their device)

    def first_batches(self, count):
        return self.batches[:count]


STAGE2 = ['cifar10_convnet', 'cifar10_convnet_nomatchaug', 'cifar10_resnet18', 'cifar10_resnet10_ap',
          'mnist_convnet']


@pytest.mark.parametrize('name', STAGE2)
def test_stage2_matches_official_golden_values(name, float64):
    golden = load_golden(f'stage2_{name}')
    protocol = golden['protocol']
    info = dataset(protocol)
    nets = official_gan(protocol['data'])
    nets.opt_g.param_groups[0]['lr'] = nets.opt_d.param_groups[0]['lr'] = protocol['lr']
    check_module('G at start', nets.G, golden['start']['G'])
    check_module('D at start', nets.D, golden['start']['D'])

    batches = uint8_batches(protocol['data'], protocol['iters'], protocol['batch'], seed=7)
    flags = ['--aug-type', 'none', '--match', 'logit', '--epochs-match-train', str(protocol['epochs_match_train']),
             '--pool-lr', str(protocol['pool_lr'])] + (['--match-aug'] if protocol['match_aug'] else [])
    args = pool_match.get_parser().parse_args(flags)
    assert (args.momentum, args.weight_decay) == (0.9, 5e-4)  # the protocol's pool SGD
    fast = FastPath.plain(CPU)
    pool = pool_match.Pool(args, info, fast, FirstEntries(batches[:protocol['epochs_match_train']]), fast.ctx())
    torch.manual_seed(2000)
    pool.build(protocol['pool'])
    check_module('pool model at start', pool.model, golden['start']['pool'])

    for i, (images, labels) in enumerate(batches):
        torch.manual_seed(1000 + i)
        metrics = pool_match.train_iteration(nets, pool, images, labels, contextlib.nullcontext())
        want = golden['after'][i]
        assert metrics['loss_match'].dtype == torch.float64, 'the match loss left float64'
        close((metrics['loss_g'] + metrics['loss_match']).item(), want['loss_g_total'], f'loss_g_total {i}')
        close(metrics['loss_match'].item(), want['loss_match'], f'loss_match {i}')
        close(metrics['loss_d'].item(), want['loss_d'], f'loss_d {i}')
        check_module(f'G after iteration {i}', nets.G, want['G'])
        check_module(f'D after iteration {i}', nets.D, want['D'])
        check_module(f'pool model after iteration {i}', pool.model, want['pool'])


# ---------------------------------------------------------------------------------------------------
# on-the-fly validation and the official test
# ---------------------------------------------------------------------------------------------------
class Recorder:
    """The logits of every forward of a module (a forward hook), for the per-batch fingerprints."""

    def __init__(self, module):
        self.logits = []
        module.register_forward_hook(lambda m, inputs, out: self.logits.append(out.detach()))


@functools.lru_cache(maxsize=None)
def generator_after_first_iteration(data):
    """The generator of the validation files: stage1_<data>.json's after its first iteration (one stage-1
    iteration costs seconds at width 196, so the CIFAR-10 files share it)."""
    nets = official_gan(data)
    torch.manual_seed(1000)
    train_iteration(nets, *uint8_batches(data, 1, 32, seed=7)[0], contextlib.nullcontext())
    return {k: v.clone() for k, v in nets.G.state_dict().items()}


VALIDATE = ['cifar10_convnet', 'cifar10_resnet18', 'mnist_convnet']


@pytest.mark.parametrize('name', VALIDATE)
def test_validation_matches_official_golden_values(name, float64):
    golden = load_golden(f'validate_{name}')
    protocol = golden['protocol']
    data, batch = protocol['data'], protocol['batch']
    info = dataset(protocol)
    G = official_gan(data).G
    G.load_state_dict(generator_after_first_iteration(data))
    G.eval()
    check_module('generator used', G, golden['generator_used'])

    args = pool_match.get_parser().parse_args([])  # the classifier SGD flags' defaults: the official ones
    assert (args.eval_lr, args.momentum, args.weight_decay) == (0.01, 0.9, 5e-4)
    torch.manual_seed(3000)
    model = build_classifier(protocol['model'], info, CPU).train()
    opt = classifier_optimizer(model.parameters(), args)
    check_module('classifier at start', model, golden['start'])
    seen = Recorder(model)
    no_augmentation, scaler = DiffAug('none'), make_scaler('off', CPU)
    for i, want in enumerate(golden['after']):
        torch.manual_seed(4000 + i)
        images, labels = generated_batch(G, batch, info, no_augmentation, CPU)
        assert labels.tolist() == want['labels'], f'labels of iteration {i}'
        loss = classifier_step(model, opt, images, labels, contextlib.nullcontext(), scaler)
        close(loss.item(), want['loss'], f'loss {i}')
        check(f'logits {i}', fingerprint([seen.logits[-1]]), want['logits'])
        check_module(f'classifier after iteration {i}', model, want['model'])

    # The official test: train mode (BatchNorm on each test batch), test batches of the batch size, fed
    # with the official test normalisation. For MNIST that is the GAN's (0.5, 0.5), which the repository
    # deliberately replaces by the dataset statistics (README, differences): the test feeds the protocol's.
    want = golden['test']
    test_info = dataclasses.replace(info, mean=tuple(protocol['test_mean']), std=tuple(protocol['test_std']))
    pairs = uint8_batches(data, protocol['test_batches'], batch, seed=11)
    split = Split(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))
    seen.logits.clear()
    top1, top5 = evaluate.test(model, split, test_info, CPU, contextlib.nullcontext(), bn='batch', batch_size=batch)
    assert model.training, 'the official test leaves the classifier in train mode'
    assert len(seen.logits) == len(want['batches'])
    for j, (logits, want_batch, (_, labels)) in enumerate(zip(seen.logits, want['batches'], pairs)):
        check(f'test logits {j}', fingerprint([logits]), want_batch['logits'])
        assert logits.argmax(1).tolist() == want_batch['pred'], f'test predictions {j}'
        assert (logits.argmax(1) == labels).sum().item() == want_batch['correct_top1']
        assert (logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item() == want_batch['correct_top5']
    assert (top1, top5) == (pytest.approx(want['top1'], rel=1e-12), pytest.approx(want['top5'], rel=1e-12))
    check_module('classifier after the test', model, want['model_after_test'])


# ---------------------------------------------------------------------------------------------------
# the fixtures themselves
# ---------------------------------------------------------------------------------------------------
# Where the project's reference folder lies beside the checkout (the developers' machines, CI), the
# repository's copies must be byte for byte the files the official code wrote: they cannot drift.
REFERENCE_GOLDEN = os.path.join(os.path.dirname(ROOT), 'shared', 'reference', 'golden')


def test_every_fixture_is_read_and_none_has_drifted():
    from test_golden_augment import FILES
    read = {f'stage1_{d}' for d in SHAPES} | {f'stage2_{n}' for n in STAGE2} | {f'validate_{n}' for n in VALIDATE}
    kept = {name[:-len('.json')] for name in os.listdir(GOLDEN) if name.endswith('.json')}
    assert kept == read | set(FILES), 'a fixture no test reads, or a test whose fixture is missing'
    if not os.path.isdir(REFERENCE_GOLDEN):
        return  # a clone on its own: the copies above are the reference
    reference = {name[:-len('.json')] for name in os.listdir(REFERENCE_GOLDEN) if name.endswith('.json')}
    assert reference == kept, 'tests/golden/ and the reference folder hold different files'
    for name in sorted(kept):
        with open(os.path.join(GOLDEN, f'{name}.json'), 'rb') as ours, \
                open(os.path.join(REFERENCE_GOLDEN, f'{name}.json'), 'rb') as theirs:
            assert ours.read() == theirs.read(), f'tests/golden/{name}.json differs from the reference copy'
