"""Data-parallel training (utils/distributed.py) on the CPU with gloo and two processes.

* the pieces in one process: batch split, the refusal of an indivisible batch, nothing changes
  without torchrun;
* two processes started with torch.multiprocessing: one generator step and one discriminator step
  under DDP give the gradients and weights of one process with the same global batch, and the
  ranks agree on stop signals, NaN, validation results and the pool model;
* end to end: `torchrun --nproc_per_node 2` on gen_condense.py, then pool_match.py from its
  checkpoint, write one set of outputs with the single-process checkpoint keys.

What is compared in the step test, and why: the discriminator has only per-sample LayerNorm, so its
loss is a mean over samples and the average of the two ranks' gradients (what DDP all-reduces) is
exactly the gradient of the global batch, the WGAN-GP double backward included. The real
generator's BatchNorm normalises with per-rank statistics (unless --sync-bn, which needs CUDA), so
the generator step is compared with a BatchNorm-free stand-in generator that maps the one-hot class
part of the noise to an image: then the generator loss is a per-sample mean as well. Random draws
inside the steps (fake labels, penalty mixes) are fixed by patching, each rank taking its slice.
"""
import argparse
import contextlib
import functools
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from data.datasets import BatchStream, Split
from models import Discriminator, Generator
import gen_condense
from utils import distributed
from data.errors import Interrupted, UserError
from gen_condense import gradient_penalty
from utils.run import build_gan
from utils.runtime import FastPath, make_scaler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device('cpu')


# -- one process -----------------------------------------------------------------------------

def test_batch_must_divide_among_processes(monkeypatch):
    assert distributed.local_batch_size(64, 2) == 32
    with pytest.raises(UserError, match='divisible by the 3 processes'):
        distributed.local_batch_size(64, 3)
    # setup refuses before it joins any process group
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '0')
    with pytest.raises(UserError, match='--batch-size 63'):
        distributed.setup(argparse.Namespace(batch_size=63), CPU)
    assert not dist.is_initialized()


def test_without_torchrun_nothing_changes(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    args = argparse.Namespace(batch_size=7, seed=0, sync_bn=False)
    assert distributed.setup(args, CPU) is CPU and not dist.is_initialized()
    model = nn.Linear(2, 2)
    assert distributed.wrap(model) is model and distributed.is_main() and distributed.world_size() == 1
    assert distributed.broadcast_object('x') == 'x' and distributed.first_bad_step(torch.tensor(-1)) == -1
    nets = build_gan(dict(num_classes=C, channels=1, img_size=28, dim_noise=16, width=8),
                     dict(num_classes=C, channels=1, img_size=28, width=8), FastPath.plain(CPU), lr=1e-3)
    G, D = nets.G, nets.D
    state = torch.get_rng_state()
    distributed.prepare(nets, args, iteration=0)
    assert nets.G_train is G and nets.D_train is D and nets.G is G and nets.D is D
    assert torch.equal(torch.get_rng_state(), state)


def _stream(n=50, batch=12, seed=5, rank=0, world=1):
    split = Split(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
                  torch.arange(n))
    return BatchStream(split, batch, CPU, torch.Generator().manual_seed(seed), rank=rank, world=world)


def test_shards_of_every_batch_make_the_single_process_batch():
    single = _stream()
    shards = [_stream(rank=r, world=3) for r in range(3)]
    assert [len(s) for s in shards] == [len(single)] * 3 and shards[0].local_batch == 4
    order = single.new_order()
    orders = [s.new_order() for s in shards]  # same generator state: same permutation everywhere
    assert all(torch.equal(o, order) for o in orders)
    whole = list(single.batches(order, start=1))
    parts = [list(s.batches(o, start=1)) for s, o in zip(shards, orders)]
    assert len(whole) == len(parts[0]) == len(single) - 1
    for i, (images, labels) in enumerate(whole):
        torch.testing.assert_close(torch.cat([p[i][1] for p in parts]), labels)
        torch.testing.assert_close(torch.cat([p[i][0] for p in parts]), images)
    seen = torch.cat([torch.cat([b[1] for b in p]) for p in parts])
    assert len(seen.unique()) == len(seen)  # disjoint
    # pool-model batches: the ranks' slices of each global batch make a whole batch, and the global
    # batches of one generator step are disjoint (one pass)
    pool = [torch.cat([p[0] for p in parts]) for parts in zip(*[list(s.first_batches(3)) for s in shards])]
    assert len(pool) == 3 and all(len(images) == single.batch_size for images in pool)
    assert len({tuple(x.flatten().tolist()) for x in torch.cat(pool)}) == 3 * single.batch_size
    with pytest.raises(UserError):
        _stream(batch=10, rank=0, world=3)


# -- two processes ---------------------------------------------------------------------------

WORLD = 2
B, C = 8, 10  # global batch, classes


class OneHotGenerator(nn.Module):
    """BatchNorm-free stand-in for G: the image depends only on the class (the one-hot noise part),
    so its loss is a mean over samples and the noise each rank draws does not matter."""

    def __init__(self):
        super().__init__()
        self.num_classes, self.dim_noise = C, 16
        self.fc = nn.Linear(C, 28 * 28)

    def forward(self, z):
        return torch.tanh(self.fc(z[:, :C])).view(-1, 1, 28, 28)


def _models():
    torch.manual_seed(0)
    return OneHotGenerator(), Discriminator(C, 1, 28, width=8)


def _one_iteration(G, D, real, labels, fake_labels, alpha):
    """generator step, then discriminator step with fixed fake labels and penalty mixes."""
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.9))
    gen_condense.generator_step(G, D, opt_g, labels, contextlib.nullcontext(), make_scaler('off', CPU))
    with mock.patch.object(torch, 'randint', lambda *a, **k: fake_labels.clone()), \
            mock.patch.object(gen_condense, 'gradient_penalty', functools.partial(gradient_penalty, alpha=alpha)):
        gen_condense.discriminator_step(G, D, opt_d, real, labels, contextlib.nullcontext(), make_scaler('off', CPU))


def _worker(rank, init_file):
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        assert distributed.setup(argparse.Namespace(batch_size=B, sync_bn=False), CPU) == CPU
        _check_steps(rank)
        _check_agreement(rank)
    finally:
        distributed.shutdown()


def _check_steps(rank):
    g = torch.Generator().manual_seed(1)
    real = torch.rand(B, 1, 28, 28, generator=g) * 2 - 1
    labels = torch.randint(C, (B,), generator=g)
    fake_labels = torch.randint(C, (B,), generator=g)
    alpha = torch.rand(B, generator=g)

    G1, D1 = _models()  # one process, the global batch
    _one_iteration(G1, D1, real, labels, fake_labels, alpha)

    G, D = _models()
    G_train, D_train = distributed.wrap(G), distributed.wrap(D)
    assert isinstance(D_train, distributed.DDP) and D_train.num_classes == C  # attributes read through
    mine = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    torch.manual_seed(100 + rank)  # the noise differs between the ranks (the stand-in ignores it)
    _one_iteration(G_train, D_train, real[mine], labels[mine], fake_labels[mine], alpha[mine])

    for name, single, parallel in (('G', G1, G), ('D', D1, D)):
        for (pname, p1), p2 in zip(single.named_parameters(), parallel.parameters()):
            # float32 sums in another order: equal to ~1e-6 of the tensor's largest gradient
            scale = p1.grad.abs().max().item()
            torch.testing.assert_close(p2.grad, p1.grad, rtol=0, atol=1e-5 * scale + 1e-8,
                                       msg=f'{name}.{pname} grad')
            torch.testing.assert_close(p2, p1, rtol=0, atol=1e-6, msg=f'{name}.{pname} after the step')
        assert list(single.state_dict()) == list(parallel.state_dict())  # checkpoints keep their keys


class _Run:
    def __init__(self):
        self.stop_signal = None
        self.calls = 0

    def stop_requested(self):
        return self.stop_signal is not None

    @distributed.main_rank_only
    def validate(self, interrupt=False):
        self.calls += 1
        if interrupt:
            self.stop_signal = 15
            raise Interrupted
        return {'convnet': {'best_top1': 12.5 + distributed.rank()}}


def _check_agreement(rank):
    run = _Run()
    assert run.validate() == {'convnet': {'best_top1': 12.5}} and run.calls == (rank == 0)
    with pytest.raises(Interrupted):
        run.validate(interrupt=True)
    assert run.stop_signal == 15  # rank 1 got no signal, but stops as rank 0 did

    run = _Run()
    decisions = []
    for it in range(6):
        if rank == 1 and it == 2:
            run.stop_signal = 2  # SIGINT on rank 1 only
        decisions.append(distributed.stop_requested(run))
    assert decisions == [False] * 3 + [True] * 3 and run.stop_signal == 2

    assert distributed.first_bad_step(torch.tensor(-1 if rank == 0 else 7)) == 7
    assert distributed.first_bad_step(torch.tensor(-1)) == -1
    assert distributed.mean_over_ranks({'loss_g': float(rank), 'gp': 2.0}) == {'loss_g': 0.5, 'gp': 2.0}
    assert distributed.broadcast_object(['resnet10', 'convnet'][rank]) == 'resnet10'


def test_two_processes_match_one(tmp_path):
    # a failing assertion on either rank comes back as ProcessRaisedException with its traceback
    mp.start_processes(_worker, args=(str(tmp_path / 'init'),), nprocs=WORLD, start_method='spawn')


# -- torchrun end to end ---------------------------------------------------------------------

TINY = ['--data', 'digits', '--width', '8', '--batch-size', '480', '--epochs', '1', '--eval-interval', '1',
        '--epochs-eval', '1', '--ipc', '1', '--print-freq', '1', '--save-every', '2', '--no-progress',
        '--eval-model', 'resnet10']  # on 28 px the ImageNet stem makes resnet10 cheaper than convnet


def _torchrun(script, tmp, *flags):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    env.pop('WORLD_SIZE', None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(WORLD),
           os.path.join(ROOT, script), *TINY, '--output-dir', os.path.join(tmp, 'results'),
           '--logs-dir', os.path.join(tmp, 'logs'), *flags]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _check_checkpoint(path, pool=None):
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    for key, model in (('generator', Generator(**ckpt['generator_config'])),
                       ('discriminator', Discriminator(**ckpt['discriminator_config']))):
        model.load_state_dict(ckpt[key])  # strict: the keys of a single-process checkpoint
    if pool is not None:
        from utils.evaluate import build_classifier
        from data.datasets import info_from_dict
        build_classifier(pool, info_from_dict(ckpt['dataset']), CPU).load_state_dict(ckpt['pool']['model'])
    return ckpt


def test_torchrun_two_processes_one_set_of_outputs(tmp_path):
    tmp = str(tmp_path)
    out = _torchrun('gen_condense.py', tmp, '--tag', 's1')
    assert out.count('stage 1:') == 1 and out.count('data-parallel: 2 processes (gloo)') == 1, out
    results, logs = os.path.join(tmp, 'results', 's1'), os.path.join(tmp, 'logs', 's1')
    assert _files(results) == ['last.pth', 'model_dict_0.pth', 'outputs/img_0.png']
    files = _files(logs)  # one args.json, one logs.txt, one tensorboard file
    assert len(files) == 3 and files[0] == 'args.json' and files[2] == 'logs.txt', files
    assert files[1].startswith('events.out.tfevents.'), files
    with open(os.path.join(logs, 'logs.txt')) as f:
        text = f.read()
    assert text.count('stage 1:') == 1 and text.count('epoch 1 iter 2:') == 1 and 'validation after' in text
    ckpt = _check_checkpoint(os.path.join(results, 'last.pth'))
    assert ckpt['iteration'] == 1437 // 480 and ckpt['epoch'] == 1 and not ckpt['validate_pending']

    out = _torchrun('pool_match.py', tmp, '--tag', 's2', '--weight', os.path.join(results, 'model_dict_0.pth'),
                    '--pool', 'resnet10', '--epochs-match-train', '1')  # BatchNorm buffers under DDP too
    assert out.count('stage 2:') == 1 and out.count('epoch 1: pool model resnet10') == 1, out
    results = os.path.join(tmp, 'results', 's2')
    assert _files(results) == ['last.pth', 'model_dict_resnet10.pth', 'outputs/img_0.png']
    assert len(_files(os.path.join(tmp, 'logs', 's2'))) == 3
    with open(os.path.join(tmp, 'logs', 's2', 'logs.txt')) as f:
        assert f.read().count('stage 2:') == 1
    _check_checkpoint(os.path.join(results, 'last.pth'), pool='resnet10')
